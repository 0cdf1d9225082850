"""A training run's folder: created once, described, logged, trimmed on resume, its config resumed.

    RUN/config.yaml        the resolved config (written at the start, again when train.minutes fits the steps)
    RUN/log.csv            one row every train.log_every training steps (:class:`RunLog`)
    RUN/checkpoints/       safetensors checkpoints (:mod:`ddpmlab.io.checkpoint`)
    RUN/.lock              held while a process trains it (:mod:`ddpmlab.training.lock`)

Every kind of training (a task on :mod:`ddpmlab.training.loop`) writes its folder through here, and the
loop takes the lock before any of these functions touches the folder.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path
from typing import IO, List, Optional, Sequence

from ddpmlab.config import Config, load_config, validate
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.log import write_rows
from ddpmlab.io.checkpoint import CONFIG_FILE, load_run_config, require_run_dir, save_run_config
from ddpmlab.training.distributed import agree_on

# keys a resumed run may change; everything else must match the stored config
RESUME_MUTABLE = {
    "train.steps", "train.log_every", "train.sample_every", "train.save_every", "train.sample_n",
    "train.sample_steps", "train.sample_sampler", "train.device", "data.num_workers",
    "train.keep_checkpoints", "train.max_bad_steps", "train.grad_accum_steps",
    "train.eval_every", "train.eval_n", "train.eval_metrics", "train.eval_sampler", "train.eval_steps",
    "train.eval_inception_weights", "train.tensorboard", "train.keep_freed_memory", "train.ema_snapshot_every",
    "train.minutes", "model.gradient_checkpointing",
}


def _is_occupied(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds anything but hidden files: the lock (the main process may already hold it)
    and the temporary files of a start that was killed before it wrote its config."""
    return run_dir.exists() and any(not p.name.startswith(".") for p in run_dir.iterdir())


def new_run_dir(cfg: Config, tag: str = "", resume_command: str = "ddpm train --resume") -> Path:
    """train.out_dir/train.name, or a name from the data and the clock (rank 0's clock: every process agrees)."""
    name = cfg.train.name or agree_on(f"{cfg.data.dataset}{tag}-{datetime.now().strftime('%Y%m%d-%H%M%S')}",
                                     cfg.train.device)
    run_dir = Path(cfg.train.out_dir) / name
    if _is_occupied(run_dir):
        raise DDPMError(f"run directory '{run_dir}' already exists and is not empty; continue it with "
                        f"`{resume_command} {run_dir}` or pick another train.name")
    return run_dir


def create_run_dir(cfg: Config, run_dir: Path, accelerator, main: bool) -> None:
    """A new run's folder with its config.yaml (new, or empty but for the lock)."""
    if _is_occupied(run_dir):
        raise DDPMError(f"run directory '{run_dir}' is not empty; resume it with --resume or choose another")
    accelerator.wait_for_everyone()
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_run_config(cfg, run_dir)  # atomically: a kill never leaves half a config.yaml


class RunLog:
    """RUN/log.csv: a header of ``fields`` and one row per :meth:`row`, flushed at once.

    A log written with other columns (an older release's) is rewritten under the new header first,
    each old value kept under its column's name.  ``enabled`` False (processes other than the main
    one): nothing is written."""

    def __init__(self, path: Path, fields: Sequence[str], enabled: bool = True):
        self.path, self.fields, self.enabled = Path(path), list(fields), enabled
        self._file: Optional[IO[str]] = None

    def __enter__(self) -> "RunLog":
        if not self.enabled:
            return self
        old = list(csv.reader(self.path.open())) if self.path.exists() else []
        if old and old[0] != self.fields:
            self._rewrite(old)
        self._file = self.path.open("a", newline="")
        if not old:
            csv.writer(self._file).writerow(self.fields)
        return self

    def _rewrite(self, rows: List[list]) -> None:
        header = rows[0]
        write_rows(self.path, [self.fields] + [[dict(zip(header, r)).get(k, "") for k in self.fields]
                                               for r in rows[1:]])

    def row(self, values: Sequence) -> None:
        if self._file is not None:
            csv.writer(self._file).writerow(values)
            self._file.flush()

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()


def report_resume(run_dir: Path, ckpt_path: Optional[Path], start: int, skipped: list) -> None:
    """Say which checkpoint a resume picked and which damaged ones it skipped."""
    for bad, reason in skipped:
        print(f"warning: skipping damaged checkpoint {bad.name} ({reason})")
    if ckpt_path is None:
        print(f"resuming {run_dir}: no loadable checkpoint, starting from step 0")
    else:
        print(f"resuming {run_dir} from {ckpt_path.name} (step {start})"
              + (f", the newest loadable one ({len(skipped)} damaged skipped)" if skipped else ""))


def resume_config(run_dir, overrides_cfg: Optional[Config], changed_keys: list, force: bool = False,
                  force_option: str = "force=True") -> Config:
    """The stored config of ``run_dir`` with the allowed overrides applied.

    Keys outside RESUME_MUTABLE are refused unless ``force`` (then each change is announced);
    ``force_option`` is how the caller sets it, for the messages.
    """
    stored = load_run_config(run_dir)
    bad = [k for k in changed_keys if k not in RESUME_MUTABLE]
    if bad and not force:
        raise ConfigError(
            f"cannot change {', '.join(bad)} when resuming {run_dir} (the run was trained with "
            f"its stored {CONFIG_FILE}); only {', '.join(sorted(RESUME_MUTABLE))} may change "
            f"(add {force_option} to change it anyway)"
        )
    if overrides_cfg is not None:
        for key in changed_keys:
            section, name = key.split(".")
            old, new = getattr(getattr(stored, section), name), getattr(getattr(overrides_cfg, section), name)
            if key in bad and old != new:
                print(f"warning: {force_option}: {key} changes from {old!r} to {new!r} in the middle of {run_dir}")
            setattr(getattr(stored, section), name, new)
    validate(stored, source=f"{run_dir}/{CONFIG_FILE} + command line")
    return stored


def resume_config_from(run_dir, overrides: List[str], force: bool = False, force_option: str = "force=True") -> Config:
    """:func:`resume_config` of the command line's ``key=value`` strings ``overrides``."""
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    return resume_config(run_dir, load_config(None, overrides) if overrides else None, keys, force, force_option)


def resume_derived(resume_dir, overrides: List[str], key: str, kind: str) -> tuple[Path, Config]:
    """A run made from another (a fine-tuning, a reflow, a ControlNet) continued: its folder and its config with
    the command line's ``overrides``; a folder whose config lacks ``key`` (e.g. "reflow.teacher") is refused as
    not a ``kind`` run."""
    run_dir = require_run_dir(resume_dir)
    cfg = resume_config_from(run_dir, overrides)
    section, name = key.split(".")
    if not getattr(getattr(cfg, section), name):
        raise DDPMError(f"'{run_dir}' is not a {kind} run (no {key} in its {CONFIG_FILE}); continue a training run "
                        f"with `ddpm train --resume {run_dir}`")
    return run_dir, cfg
