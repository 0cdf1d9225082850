"""What the demo page serves and within which bounds, without Gradio: :class:`Limits` (the largest request),
the parsers of the page's fields, and :class:`Runs` (the runs loaded once, and the request folders).

Every request writes into a fresh folder below one folder the demo made for itself (never a folder the
user already had, so the page can offer nothing else to download); the newest ``keep`` request folders
are kept and older ones deleted, so no client can fill the disk.

ControlNet runs (``ddpm train-controlnet``) among the folders given are no runs of their own: they are offered on
the ControlNet tab of the base they were trained on, beside those found next to a served base (``BASE-controlnet-*``,
the folders ``ddpm train-controlnet`` makes), each loaded once.
"""

from __future__ import annotations

import ipaddress
import math
import shutil
import tempfile
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch

from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import is_run_dir, load_run_config, require_run_dir
from ddpmlab.models.controlnet import ControlNet
from ddpmlab.runs import Run, load_run
from ddpmlab.runs.control import controlnet_for
from ddpmlab.samplers.editing import repaint_nfe

LOOPBACK = ("127.0.0.1", "localhost", "::1")
POINTS_PER_SAMPLE = 100  # a 2-D run may draw this many points per image sample of --max-samples
KEEP_REQUESTS = 100  # request folders kept (ddpm demo --keep-requests)


@dataclass(frozen=True)
class Limits:
    """The largest request the page serves (``ddpm demo --max-samples / --max-steps``; ``max_frames``
    snapshots of the reverse process)."""

    max_samples: int = 256
    max_steps: int = 1000
    max_frames: int = 100

    def samples_for(self, run: Run) -> int:
        """The most samples of ``run`` per request: --max-samples images, or POINTS_PER_SAMPLE times as many
        2-D points (an MLP on points costs about what a few pixels of a UNet do)."""
        return self.max_samples * (1 if run.is_image else POINTS_PER_SAMPLE)

    def check(self, n: int, steps: Optional[int] = None, what: str = "samples", run: Optional[Run] = None) -> None:
        cap = self.max_samples if run is None else self.samples_for(run)
        if n > cap:
            unit = "" if run is None or run.is_image else f" x {POINTS_PER_SAMPLE} for 2-D points"
            raise DDPMError(f"n = {n} {what} is more than this page serves (at most {cap}: --max-samples "
                            f"{self.max_samples}{unit}); ask for fewer")
        if steps is not None and steps > self.max_steps:
            raise DDPMError(f"steps = {steps} is more than this page serves (at most {self.max_steps}, "
                            "set by ddpm demo --max-steps); ask for fewer")

    def check_repaint(self, steps: int, jump_length: int, jump_n_sample: int) -> None:
        """RePaint's network evaluations (its resampling jumps repeat steps) within --max-steps, counted
        before anything is built (Lugmayr et al. 2022, Sec. 4.2)."""
        nfe = repaint_nfe(steps, jump_length, jump_n_sample)
        if nfe > self.max_steps:
            raise DDPMError(f"RePaint with {steps} steps, jump length {jump_length} and jump n sample "
                            f"{jump_n_sample} takes {nfe} network evaluations, more than this page serves (at most "
                            f"{self.max_steps}, set by ddpm demo --max-steps); ask for fewer steps or jumps")

    def check_frames(self, frames: int) -> None:
        if frames > self.max_frames:
            raise DDPMError(f"snapshots = {frames} is more than this page serves (at most {self.max_frames}); "
                            "ask for fewer")


def as_int(value, name: str, minimum: Optional[int] = None) -> Optional[int]:
    """A number field's value as an int (None stays None); '2.5' or 'abc' is refused naming the field."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DDPMError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(f) or f != int(f):
        raise DDPMError(f"{name} must be a whole number, got {value!r}")
    if minimum is not None and int(f) < minimum:
        raise DDPMError(f"{name} must be at least {minimum}, got {int(f)}")
    return int(f)


def as_label(value) -> Optional[object]:
    """A class field's value: None when empty, a whole number as an int, else the text (a class name)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, float):
        return as_int(value, "class")
    return value.strip() if isinstance(value, str) else value


def as_float(value, name: str) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DDPMError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(f):
        raise DDPMError(f"{name} must be a finite number, got {value!r}")
    return f


def as_prompts(value) -> Optional[List[str]]:
    """A prompt box's text as prompts, one a line (blank lines skipped, as ``--prompts FILE`` reads them);
    None when it holds none (the run's own prompts)."""
    prompts = [line.strip() for line in str(value or "").splitlines() if line.strip()]
    return prompts or None


def as_text(value) -> Optional[str]:
    """A text field's value, None when empty (the negative prompt: the empty prompt then)."""
    text = str(value or "").strip()
    return text or None


def fresh_folder(parent=None) -> Path:
    """A new, empty folder ddpm-demo-XXXXXXXX made for the page: below ``parent`` (``--out``, made if
    missing), or in the system's temporary folder."""
    if parent is None:
        return Path(tempfile.mkdtemp(prefix="ddpm-demo-"))
    parent = Path(parent).expanduser()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="ddpm-demo-", dir=parent))
    except OSError as e:
        raise DDPMError(f"--out '{parent}': cannot make the demo's folder there ({e.strerror or e}); "
                        "choose another --out") from None


class Runs:
    """The runs the page serves, each loaded once per weights kind (EMA or raw) on ``device``; the request
    folders below a fresh folder in ``out_root`` (see :func:`fresh_folder`), the newest ``keep`` of them."""

    def __init__(self, run_dirs: Sequence, device: torch.device, out_root=None, keep: int = KEEP_REQUESTS):
        if not run_dirs:
            raise DDPMError("ddpm demo needs at least one RUN_DIR (a folder written by `ddpm train`)")
        if keep < 1:
            raise DDPMError(f"--keep-requests must be at least 1, got {keep}")
        given = [(str(require_run_dir(d)), controlnet_base(d)) for d in run_dirs]
        self.dirs = [d for d, base in given if base is None]
        self.controlnet_dirs = [(d, base) for d, base in given if base is not None]  # (ControlNet, its base)
        if not self.dirs:
            raise DDPMError(f"ddpm demo got only ControlNet runs; give their base too: ddpm demo "
                            f"{given[0][1]} {given[0][0]}")
        self.device = device
        self.out_root = fresh_folder(out_root)
        self.keep = keep
        self.plots: Dict[Tuple, Path] = {}  # the run tab's loss plots, by (run, state of its log.csv)
        self._cache: Dict[Tuple[str, str], Run] = {}
        self._controlnets: Dict[Tuple[str, str, str], ControlNet] = {}
        self._folders: Deque[Path] = deque()
        self._lock = threading.Lock()
        self._count = 0

    def get(self, run_dir: Optional[str], weights: str = "ema") -> Run:
        key = (str(run_dir or self.dirs[0]), weights or "ema")
        if key[0] not in self.dirs:
            raise DDPMError(f"run '{key[0]}' is not served by this page; choose one of {', '.join(self.dirs)}")
        with self._lock:
            if key not in self._cache:
                self._cache[key] = load_run(key[0], key[1], self.device)
            return self._cache[key]

    def new_folder(self, kind: str) -> Path:
        """A fresh output folder out_root/<n>-<kind>/ for one request; the oldest beyond ``keep`` go."""
        with self._lock:
            self._count += 1
            path = self.out_root / f"{self._count:05d}-{kind}"
            path.mkdir(parents=True, exist_ok=True)
            self._folders.append(path)
            old = [self._folders.popleft() for _ in range(len(self._folders) - self.keep)]
        for folder in old:
            shutil.rmtree(folder, ignore_errors=True)
        return path

    def controlnets(self, run_dir: Optional[str]) -> List[str]:
        """The ControlNet runs of the served run ``run_dir``: those given whose base it is, then those beside it
        (RUN-controlnet-*, ``ddpm train-controlnet``'s folders) trained on it, sorted."""
        base = str(run_dir or self.dirs[0])
        found = [d for d, b in self.controlnet_dirs if same_run(b, base)]
        for d in sorted(Path(base).parent.glob(f"{Path(base).name}-controlnet-*")):
            if str(d) not in found and is_run_dir(d) and same_run(controlnet_base(d), base):
                found.append(str(d))
        return found

    def controlnet(self, run: Run, controlnet_dir: str) -> ControlNet:
        """The EMA ControlNet of ``controlnet_dir`` (one of :meth:`controlnets`) on ``run``, loaded once."""
        if controlnet_dir not in self.controlnets(str(run.dir)):
            raise DDPMError(f"ControlNet '{controlnet_dir}' is not served for the run {run.dir}; choose one of "
                            f"{', '.join(self.controlnets(str(run.dir))) or 'none (train one: ddpm train-controlnet)'}")
        key = (controlnet_dir, str(run.dir), run.weights)
        with self._lock:
            if key not in self._controlnets:
                self._controlnets[key] = controlnet_for(run, controlnet_dir, "ema", say=lambda _msg: None)
            return self._controlnets[key]


def controlnet_base(run_dir) -> Optional[str]:
    """The base run of a ControlNet run (its controlnet.base), None for any other run."""
    return load_run_config(run_dir).controlnet.base or None


def same_run(a: Optional[str], b: str) -> bool:
    """Whether the run folders ``a`` and ``b`` are one: the same resolved path, or, where ``a`` (a ControlNet's
    controlnet.base, written from the folder it trained in) is not found from here, the same folder name."""
    if a is None:
        return False
    pa = Path(a).expanduser()
    return pa.resolve() == Path(b).resolve() if pa.exists() else pa.name == Path(b).name


def host_warning(host: str, auth: Optional[Tuple[str, str]]) -> Optional[str]:
    """The warning for a page that anyone on the network can use (a non-loopback --host without --auth)."""
    try:
        loopback = host in LOOPBACK or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if loopback or auth:
        return None
    return (f"warning: ddpm demo listens on {host} without --auth: anyone who can reach this machine may sample, "
            "upload pictures and use its compute; add --auth USER:PASSWORD, or serve on 127.0.0.1")
