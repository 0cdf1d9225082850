"""Run-directory layout, atomic safetensors checkpoints and the resume state.

A run directory::

    RUN/
      config.yaml                 the resolved config of the run
      log.csv                     step, loss, lr, grad_norm, it/s
      samples/step_000500.png     sample grids (EMA weights)
      checkpoints/step_000500/    model.safetensors, ema.safetensors, optimizer.safetensors,
                                  state.json (step, ...)
      checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, so a crash
mid-save never damages the previous one.  Nothing is ever unpickled: weights and
optimizer tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ddpmlab.atomic import atomic_write_text, fsync_dir
from ddpmlab.config import Config, config_from_dict
from ddpmlab.errors import OPTION, DDPMError, OptionError
from ddpmlab.io.adapters import apply_adapters
from ddpmlab.io.weights import load_state_dict_file
from ddpmlab.models import build_model
from ddpmlab.models.lora import is_adapter_key, merged_state

CONFIG_FILE = "config.yaml"
CKPT_DIR = "checkpoints"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def require_run_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DDPMError(f"run directory '{path}' does not exist; give the folder that `ddpm train` created "
                        "(under runs/)")
    if not is_run_dir(path):
        raise DDPMError(
            f"'{path}' is not a ddpmlab run (no {CONFIG_FILE} inside); give the folder that `ddpm train` created"
        )
    return path


def load_run_config(run_dir) -> Config:
    run_dir = require_run_dir(run_dir)
    raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    return config_from_dict(raw, source=str(run_dir / CONFIG_FILE))


def _contiguous(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def flatten_optimizer_state(opt_state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON metadata."""
    tensors, meta_state = {}, {}
    for pid, st in opt_state["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
                meta_state[str(pid)][k] = {"tensor": f"{pid}.{k}"}
            else:
                meta_state[str(pid)][k] = v
    return _contiguous(tensors), {"state": meta_state, "param_groups": opt_state["param_groups"]}


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {
            k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in st.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


class CheckpointError(DDPMError):
    """A checkpoint could not be written (disk full, file-size limit, permissions)."""


def _set_aside(root: Path) -> list:
    """``.step_N.old`` folders whose ``step_N`` is gone: a save of step N again was killed between
    setting the old version aside and renaming the new one into place (the old one is complete)."""
    return [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".step_") and p.name.endswith(".old")
            and not (root / p.name[1:-4]).exists()]


def _remove_leftovers(root: Path) -> None:
    """Put back a checkpoint set aside by a killed save, then delete the temporary files and folders a crash
    mid-save left behind (the run lock is ours)."""
    for p in _set_aside(root):
        os.replace(p, root / p.name[1:-4])
    for p in root.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.endswith(".old")):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _write_checkpoint_files(tmp: Path, step: int, model_sd: dict, ema_sd: dict, opt_sd: dict,
                            extra: Optional[dict], weights: Optional[Dict[str, dict]] = None) -> None:
    tmp.mkdir()
    save_file(_contiguous(model_sd), str(tmp / "model.safetensors"))
    save_file(_contiguous(ema_sd), str(tmp / "ema.safetensors"))
    for name, sd in (weights or {}).items():  # further weights of the run, e.g. power-function EMAs
        save_file(_contiguous(sd), str(tmp / f"{name}.safetensors"))
    opt_tensors, opt_meta = flatten_optimizer_state(opt_sd)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "optimizer": opt_meta, **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():  # flushed to disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fsync_dir(tmp)


def _io_reason(e: Exception) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}{f': {e.filename}' if e.filename else ''}"
    text = " ".join(str(e).split())
    return text.split("I/O error: ", 1)[-1] or type(e).__name__


def save_checkpoint(run_dir: Path, step: int, model_sd: dict, ema_sd: dict, opt_sd: dict,
                    extra: Optional[dict] = None, keep: int = 3, weights: Optional[Dict[str, dict]] = None) -> Path:
    """Atomically write checkpoint ``step`` and point ``latest`` at it; keep the newest ``keep``.

    The files go to ``checkpoints/.step_N.tmp/``, are fsynced, and the folder is renamed to
    ``step_N``: a crash or a full disk mid-save leaves every earlier checkpoint as it was,
    and a failed write raises :class:`CheckpointError` saying which checkpoint is intact.
    """
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final, tmp, old = root / name, root / f".{name}.tmp", root / f".{name}.old"
    _remove_leftovers(root)
    try:
        _write_checkpoint_files(tmp, step, model_sd, ema_sd, opt_sd, extra, weights)
        if final.exists():  # re-saving a step (e.g. after resuming past a damaged checkpoint)
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", name)
    except (OSError, SafetensorError) as e:
        _remove_leftovers(root)
        prev = [p.name for p in list_checkpoints(run_dir) if p.name != name]
        kept = f"the previous checkpoint {prev[0]} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointError(
            f"could not write checkpoint {name} to '{root}' ({_io_reason(e)}); {kept}. Free disk space "
            f"(or raise the file-size limit) and continue with `ddpm train --resume {run_dir}`"
        ) from None
    shutil.rmtree(old, ignore_errors=True)
    # keep this one and the keep-1 before it; newer ones are leftovers resume skipped as damaged
    older = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) < step]  # newest first
    stale = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) > step]
    for p in stale + older[max(keep, 1) - 1:]:
        trash = root / f".{p.name}.old"
        os.replace(p, trash)  # out of sight first: a crash mid-delete never leaves a half checkpoint
        shutil.rmtree(trash, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int:
    """The training step of a checkpoint folder ``step_N`` (or of ``.step_N.old``, one set aside)."""
    return int(path.name.strip(".").split("_", 1)[1].split(".")[0])


def list_checkpoints(run_dir) -> list:
    """A run's checkpoint folders, newest (highest training step) first; a checkpoint that a killed save
    had set aside (``.step_N.old`` without ``step_N``) counts as step N until the next save puts it back."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found + _set_aside(root), key=checkpoint_step, reverse=True)


def load_checkpoint(ckpt: Path, parts: Optional[Tuple[str, ...]] = None) -> dict:
    """Read one checkpoint folder; raises on any missing or damaged file.  ``parts``: only these of
    "model", "ema", "optimizer", "weights" (sampling needs one set of weights, not the optimizer)."""
    parts = parts or ("model", "ema", "optimizer", "weights")
    state = json.loads((ckpt / "state.json").read_text())
    out = {"step": state["step"], "state": state}
    for part in ("model", "ema"):
        if part in parts:
            out[part] = load_file(str(ckpt / f"{part}.safetensors"))
    if "optimizer" in parts:
        out["optimizer"] = unflatten_optimizer_state(load_file(str(ckpt / "optimizer.safetensors")), state["optimizer"])
    if "weights" in parts:
        out["weights"] = {p.stem: load_file(str(p)) for p in sorted(ckpt.glob("*.safetensors"))
                          if p.stem not in ("model", "ema", "optimizer")}
    return out


def find_checkpoint(run_dir, parts: Optional[Tuple[str, ...]] = None) -> Tuple[Optional[Path], Optional[dict], list]:
    """``(path, checkpoint, skipped)``: the newest loadable checkpoint of a run (or None, None)
    and the newer ones that could not be loaded, as ``[(path, reason), ...]``; ``parts``: as
    :func:`load_checkpoint` (default all)."""
    skipped = []
    for ckpt in list_checkpoints(run_dir):
        try:
            return ckpt, load_checkpoint(ckpt, parts), skipped
        except Exception as e:  # noqa: BLE001 - damaged in any way: fall back to the previous one
            skipped.append((ckpt, f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"))
    return None, None, skipped


def latest_checkpoint(run_dir) -> Optional[Tuple[Path, dict]]:
    """The newest loadable checkpoint of a run, skipping (and reporting) damaged ones."""
    path, ckpt, skipped = find_checkpoint(run_dir)
    for bad, reason in skipped:
        warnings.warn(f"checkpoint {bad} is damaged ({reason}); trying an older one")
    return None if path is None else (path, ckpt)


def newest_weights(run_dir, which: str = "ema") -> Tuple[Path, Dict[str, torch.Tensor]]:
    """(checkpoint folder, ``which`` weights) of a run's newest loadable checkpoint.

    ``which`` is 'ema' or 'model'; DDPMError says why there is none: no checkpoint yet, every
    one damaged (each named with its reason), or the newest lacking ``which`` (an OptionError
    about 'weights' that says to pick the other weights).
    """
    run_dir = require_run_dir(run_dir)
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise DDPMError(f"run '{run_dir}' has no checkpoint yet; train it first (ddpm train --resume {run_dir})")
    other = "model" if which == "ema" else "ema"
    if not (ckpts[0] / f"{which}.safetensors").is_file() and (ckpts[0] / f"{other}.safetensors").is_file():
        kind = {"ema": "EMA", "model": "raw (model)"}.get(which, which)
        raise OptionError("weights", f"run '{run_dir}': checkpoint {ckpts[0].name} has no {kind} weights "
                                     f"({which}.safetensors is missing); use the other weights ({OPTION} {other})")
    path, ckpt, skipped = find_checkpoint(run_dir, parts=(which,))  # the weights only: no optimizer state
    if path is None:
        damaged = "; ".join(f"{p.name} is damaged ({reason})" for p, reason in skipped)
        raise DDPMError(f"run '{run_dir}' has no loadable checkpoint: {damaged}")
    for bad, reason in skipped:
        warnings.warn(f"checkpoint {bad} is damaged ({reason}); using {path.name}")
    return path, plain_weights(run_dir, ckpt[which])


def plain_weights(run_dir, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A checkpoint's weights as the plain network's: a LoRA run's (finetune.method lora) with its adapters baked
    in at the scale alpha / rank of its lora section (:func:`ddpmlab.models.lora.merged_state`)."""
    if not any(is_adapter_key(k) for k in state):
        return state
    lora = load_run_config(run_dir).lora
    return merged_state(state, lora.alpha / lora.rank)


def load_weights(run_dir, which: str = "ema") -> Dict[str, torch.Tensor]:
    """Weights of a run's newest loadable checkpoint: ``which`` is 'ema' or 'model'."""
    return newest_weights(run_dir, which)[1]


def load_model(run_dir, which: str = "ema", device="cpu", weights_file=None, adapters=()):
    """(config, model in eval mode) of a trained run, with its ``which`` weights.

    ``weights_file``: load these weights instead (safetensors, or a PyTorch state dict read
    with ``torch.load(weights_only=True)``; see :func:`ddpmlab.io.weights.load_state_dict_file`).
    ``adapters``: LoRA adapter files (``ADAPTER[:SCALE]``) baked into the weights
    (:func:`ddpmlab.io.adapters.apply_adapters`).
    """
    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    if weights_file is None:
        model.load_state_dict(load_weights(run_dir, which))
    else:
        state = load_state_dict_file(weights_file)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise DDPMError(f"weights file '{weights_file}' does not fit the model of run '{run_dir}' "
                            f"({' '.join(str(e).split())[:300]})") from None
    apply_adapters(model, adapters, f"run '{run_dir}'")
    return cfg, model.to(device).eval()


def restore_training_state(path: Path, ckpt: dict, model, ema, opt) -> None:
    """Load a checkpoint's weights, EMA and optimizer state; DDPMError when they do not fit the model."""
    try:
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise DDPMError(
            f"checkpoint {path} does not fit the model built from the run's {CONFIG_FILE} "
            f"({' '.join(str(e).split())[:240]}); the architecture cannot change on resume, not even when "
            "forced: start a new run instead"
        ) from None


def save_run_config(cfg: Config, run_dir) -> None:
    """Write the resolved config of a run atomically (a crash never leaves half a config.yaml)."""
    atomic_write_text(Path(run_dir) / CONFIG_FILE, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
