"""Reliability helpers for the trainer: the run lock, the non-finite step guard, safe weight loading.

* :class:`RunLock` - ``RUN/.lock`` (pid, host, process start time) created with
  ``O_CREAT | O_EXCL``: a second ``ddpm train`` on the same run refuses; a lock left
  by a dead process on this host (SIGKILL, OOM killer, power loss) is taken over with
  a message.
* :class:`BadStepGuard` - a step whose loss or gradient norm is NaN/inf never reaches
  the weights (no optimizer step, no EMA update); it is counted, and after
  ``train.max_bad_steps`` such steps in a row the run stops with a clear message.
* :func:`load_state_dict_file` - user-supplied weights only from safetensors or from
  ``torch.load(weights_only=True)``: a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from .errors import DDPMError

LOCK_FILE = ".lock"


# ----------------------------------------------------------------------------- run lock

def is_main_rank() -> bool:
    """True in the process that owns the run directory (rank 0 under torchrun / accelerate launch)."""
    return os.environ.get("RANK", "0") == "0"


def _proc_start_time(pid: int) -> Optional[str]:
    """The kernel's start time of ``pid`` (Linux /proc, field 22), to detect a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int, started: Optional[str]) -> bool:
    """Is process ``pid`` (the one that started at ``started``) still running on this host?"""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":  # os.kill would terminate the process: assume alive, the user decides
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state in ("Z", "X"):  # killed, not yet reaped: it will never write again
            return False
    except (OSError, IndexError):
        pass
    now = _proc_start_time(pid)
    return not (started and now and now != started)  # same pid, other process: the holder is gone


class RunLock:
    """Exclusive ownership of a run directory for one training process.

    ``with RunLock(run_dir): ...`` creates ``run_dir/.lock`` atomically (``O_EXCL``) holding
    JSON ``{pid, host, started, since}``; a live holder makes it raise :class:`DDPMError`;
    a holder that is gone (same host, pid dead or reused) is reported through ``say`` and
    replaced.  The lock is removed on exit, if it is still ours, and so is the directory if the
    lock created it and nothing else was written there (a run that failed before it started).
    """

    def __init__(self, run_dir, enabled: bool = True, say: Callable[[str], None] = print):
        self.path = Path(run_dir) / LOCK_FILE
        self.enabled = enabled
        self.say = say
        self.created_dir = False
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": _proc_start_time(os.getpid()),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self.release()

    def acquire(self) -> None:
        self.created_dir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self.record))
                f.flush()
                os.fsync(f.fileno())
            return
        raise DDPMError(f"could not take the lock {self.path}: other processes keep creating it; "
                        "make sure only one `ddpm train` uses this run")

    def _read(self) -> tuple[str, Optional[dict]]:
        for _ in range(20):  # a holder that just created the file may still be writing it
            try:
                text = self.path.read_text()
            except FileNotFoundError:
                return "", {}
            try:
                return text, json.loads(text)
            except ValueError:
                time.sleep(0.05)
        return text, None

    def _handle_existing(self) -> None:
        text, holder = self._read()
        if holder == {}:  # vanished meanwhile: try again
            return
        run = self.path.parent
        if holder is None:  # unreadable for a second: its writer died between create and write
            self.say(f"warning: {self.path} is unreadable ({text[:40]!r}); treating it as a stale lock")
        else:
            pid, host = holder.get("pid"), holder.get("host")
            who = f"pid {pid} on host {host} (since {holder.get('since', '?')})"
            if host != socket.gethostname():
                raise DDPMError(f"run '{run}' is locked by {who}, another machine; if no `ddpm train` runs "
                                f"there any more, delete {self.path} and try again")
            if _pid_alive(pid, holder.get("started")):
                raise DDPMError(f"run '{run}' is in use by another `ddpm train` ({who}); wait for it to finish "
                                f"or stop it (Ctrl-C / kill {pid} saves a checkpoint) before resuming")
            self.say(f"note: taking over the stale lock of '{run}' left by {who}: that process is gone")
        self._remove_if_unchanged(text)

    def _remove_if_unchanged(self, text: str) -> None:
        """Delete the stale lock, unless another process replaced it since we read it."""
        grabbed = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
        try:
            os.rename(self.path, grabbed)
        except FileNotFoundError:
            return
        try:
            if grabbed.read_text() != text:  # a fresh lock of a live process: put it back
                try:
                    os.link(grabbed, self.path)
                except OSError:
                    pass
        finally:
            grabbed.unlink(missing_ok=True)

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
                if self.created_dir:
                    self.path.parent.rmdir()  # only if empty: a run that wrote nothing leaves no folder
        except (OSError, ValueError):
            pass


# ----------------------------------------------------------------------------- non-finite steps

class BadStepGuard:
    """Counts steps with a non-finite loss or gradient norm; stops the run after too many in a row.

    ``ok = guard.check(step, loss, grad_norm)`` returns whether the step may update the
    weights; ``guard.total`` (all bad steps), ``guard.in_a_row`` and ``guard.since_log``
    (reset by :meth:`take_since_log`) feed the log.
    """

    def __init__(self, max_bad_steps: int, say: Callable[[str], None] = print, run_dir=None):
        self.max_bad_steps = max_bad_steps
        self.say = say
        self.run_dir = run_dir
        self.total = self.in_a_row = self.since_log = 0

    def check(self, step: int, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], accelerator=None) -> bool:
        """True when ``loss`` and ``grad_norm`` are finite (on every process); counts and reports bad steps."""
        loss_ok = bool(torch.isfinite(loss.detach().float()).all())
        norm_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm).float()).all())
        if accelerator is not None and accelerator.num_processes > 1:  # every rank must take the same decision
            bad = torch.tensor(float(not (loss_ok and norm_ok)), device=accelerator.device)
            norm_ok = norm_ok and accelerator.reduce(bad, "max").item() == 0.0
        if loss_ok and norm_ok:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        self.since_log += 1
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        what = f"loss={float(loss.detach().float().mean()):.4g}, grad_norm={norm:.4g}"
        scaler = getattr(accelerator, "scaler", None) is not None
        kind = "fp16 gradient overflow (the scaler lowers its scale)" if scaler and loss_ok else \
            "non-finite loss or gradient"
        self.say(f"step {step + 1}: {kind} ({what}): step skipped, weights and EMA unchanged "
                 f"({self.in_a_row} in a row; the run stops at train.max_bad_steps={self.max_bad_steps})")
        if self.in_a_row >= self.max_bad_steps:
            from .checkpoint import list_checkpoints

            ckpts = list_checkpoints(self.run_dir) if self.run_dir is not None else []
            last = f"the last checkpoint {ckpts[0].name} is intact" if ckpts else "no checkpoint was written yet"
            raise DDPMError(
                f"stopped at step {step + 1}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"({what}); none reached the weights and {last}. Lower train.lr, set train.grad_clip or check "
                f"the data, then continue with `ddpm train --resume {self.run_dir} --force train.lr=...`"
            )
        return False

    def take_since_log(self) -> int:
        n, self.since_log = self.since_log, 0
        return n


def optimizer_step(accelerator, opt, ok: bool) -> bool:
    """Apply the optimizer step of a checked step; return whether the weights changed.

    Without a gradient scaler a bad step (``ok`` False) is simply not applied.  With one
    (fp16 on GPU) ``opt.step()`` is always called: the scaler sees the inf/NaN gradients,
    skips the update itself and lowers its scale, which is what lets fp16 recover from an
    overflow; calling it also closes the scaler's unscale/update cycle of this step.
    """
    if getattr(accelerator, "scaler", None) is not None:
        opt.step()
        return ok and not accelerator.optimizer_step_was_skipped
    if ok:
        opt.step()
    return ok


# ----------------------------------------------------------------------------- safe weight loading

_SAFE_SUFFIXES = (".safetensors",)


def _pickle_culprit(message: str) -> str:
    m = re.search(r"Unsupported (global: GLOBAL \S+|operand \S+|class \S+)", message)
    return m.group(1).rstrip(".") if m else message.strip().splitlines()[0][:120]


def load_state_dict_file(path) -> Dict[str, torch.Tensor]:
    """Tensors of a user-supplied weights file: safetensors, or a PyTorch state dict.

    PyTorch files go through ``torch.load(weights_only=True)``: its unpickler builds only
    tensors and plain containers, so a file crafted to run code on load is refused
    (:class:`DDPMError`) before anything runs.  Nested ``{"state_dict": ...}`` /
    ``{"model": ...}`` / ``{"ema": ...}`` wrappers are unwrapped (EMA first).
    """
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"weights file '{path}' does not exist")
    if path.suffix.lower() in _SAFE_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
            raise DDPMError(f"weights file '{path}' is not a valid safetensors file "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    import pickle

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol notices of the restricted unpickler
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise DDPMError(
            f"refused to load '{path}': it is a pickle that asks to run code or build objects other than "
            f"tensors ({_pickle_culprit(str(e))}); ddpmlab loads only safetensors or plain PyTorch state dicts "
            "(torch.load weights_only=True). Re-save trusted weights with safetensors.torch.save_file"
        ) from None
    except Exception as e:  # noqa: BLE001
        raise DDPMError(f"weights file '{path}' could not be read as safetensors or a PyTorch state dict "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return _unwrap_state_dict(obj, path)


def _unwrap_state_dict(obj, path: Path) -> Dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("ema", "state_dict", "model") if isinstance(obj.get(k), dict)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise DDPMError(f"weights file '{path}' holds no state dict of tensors (found {type(obj).__name__}); "
                    "give a file saved from model.state_dict()")
