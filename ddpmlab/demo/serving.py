"""What the demo page serves and within which bounds, without Gradio: :class:`Limits` (the largest request),
the parsers of the page's fields, and :class:`Runs` (the runs loaded once, and the request folders).

Every request writes into a fresh folder below one folder the demo made for itself (never a folder the
user already had, so the page can offer nothing else to download); the newest ``keep`` request folders
are kept and older ones deleted, so no client can fill the disk.
"""

from __future__ import annotations

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
from ddpmlab.io.checkpoint import require_run_dir
from ddpmlab.runs import Run, load_run
from ddpmlab.samplers.editing import repaint_nfe

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
        self.dirs = [str(require_run_dir(d)) for d in run_dirs]
        self.device = device
        self.out_root = fresh_folder(out_root)
        self.keep = keep
        self.plots: Dict[Tuple, Path] = {}  # the run tab's loss plots, by (run, state of its log.csv)
        self._cache: Dict[Tuple[str, str], Run] = {}
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
