"""Evaluation and TensorBoard logging during training (main process only).

    RUN/tensorboard/   event files: train/loss, train/lr, ..., eval/fid, ..., sample images
    RUN/eval.csv       step and the metrics of each evaluation (train.eval_every)

View with ``tensorboard --logdir runs``.  On resume, events and rows after the checkpoint
step are dropped, so the curves continue without duplicates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from PIL import Image

from ddpmlab.errors import ConfigError, DDPMError, OptionError
from ddpmlab.evaluate.features import build_extractor
from ddpmlab.evaluate.log import append_eval_row, trim_eval_log
from ddpmlab.evaluate.metrics import check_fid_samples
from ddpmlab.runs import Run
from ddpmlab.evaluate.run import (
    EvalContext,
    EvalSettings,
    check_metrics,
    default_metrics,
    evaluate_model,
    needs_features,
)

TB_DIR = "tensorboard"
# how a run's config names each evaluation option (an OptionError of ddpmlab.evaluate is named so here)
EVAL_OPTION_NAMES = {"metrics": "train.eval_metrics", "n": "train.eval_n", "sampler": "train.eval_sampler",
                     "steps": "train.eval_steps", "extractor": "train.eval_inception_weights",
                     "inception_weights": "train.eval_inception_weights"}


def eval_settings(cfg) -> EvalSettings:
    """The evaluation a run does every ``train.eval_every`` steps, from its train.eval_* keys."""
    t = cfg.train
    weights = t.eval_inception_weights
    return EvalSettings(metrics=list(t.eval_metrics or []), n=int(t.eval_n), sampler=t.eval_sampler,
                        steps=int(t.eval_steps), seed=t.seed, extractor="inception" if weights else "classifier",
                        inception_weights=weights, baseline=False)


def config_words(e: DDPMError) -> str:
    """The message of ``e``, an OptionError's with the option named as the run's config names it."""
    return e.named(EVAL_OPTION_NAMES) if isinstance(e, OptionError) else str(e)


class TrainingMonitor:
    """Writes TensorBoard scalars and images, and evaluates the EMA model every N steps."""

    def __init__(self, cfg, run_dir: Path, dataset, start_step: int = 0, device="cpu", progress: bool = False,
                 say=print, evaluate: bool = True):
        """``evaluate``: evaluate every train.eval_every steps (False: TensorBoard only, ``dataset`` unused)."""
        self.say = say
        self.cfg, self.run_dir, self.dataset, self.device = cfg, Path(run_dir), dataset, device
        self.every = cfg.train.eval_every if evaluate else 0
        self.settings = eval_settings(cfg)
        self.progress = progress
        self._extractor = self._reference = None
        self.writer = None
        if cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / TB_DIR), purge_step=start_step or None, flush_secs=20)
        if self.every:
            self._check()
            trim_eval_log(self.run_dir, start_step)

    def _check(self) -> None:
        """Refuse at the start, not after hours of training, an evaluation that cannot run."""
        s = self.settings
        try:
            image = self.dataset.is_image
            shape = tuple(self.dataset.sample_shape) if image else None
            names = s.metrics or default_metrics(image, bool(self.cfg.model.num_classes), s.extractor, shape)
            check_metrics(names, image, shape)
            if image and needs_features(names):
                self._extractor = build_extractor(s.extractor, tuple(self.dataset.sample_shape), s.inception_weights,
                                                  self.device)
                if "fid" in names:
                    check_fid_samples(s.n, self._extractor.num_features)
        except DDPMError as e:
            raise ConfigError(f"train.eval_every: {config_words(e)}") from None

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, float(v), step)

    def image_file(self, tag: str, path: Path, step: int) -> None:
        """Show a PNG the trainer wrote (a sample grid or a scatter plot) in TensorBoard."""
        if self.writer is None or path is None or not Path(path).is_file():
            return
        arr = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image(tag, arr, step, dataformats="HWC")

    def maybe_evaluate(self, step: int, model, schedule, final: bool = False) -> Optional[dict]:
        """Evaluate ``model`` (the EMA) at every ``eval_every``-th step and at the last one."""
        if not self.every or (step % self.every and not final):
            return None
        run = Run(self.cfg, model, schedule, torch.device(self.device), self.run_dir)  # class names, a text run's prompts
        ctx = EvalContext(self.cfg, model, schedule, self.dataset, self.settings, self.device, self.progress,
                          extractor=self._extractor, reference=self._reference, run=run)
        try:
            results = evaluate_model(ctx)
        except OptionError as e:
            raise ConfigError(config_words(e)) from None
        if "reference" in ctx.__dict__:
            self._reference = ctx.reference  # computed (or read from the cache) once per run
        values = results["metrics"]
        self.scalars(step, {f"eval/{k}": v for k, v in values.items()})
        append_eval_row(self.run_dir, step, values)
        self.say("eval at step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in values.items())))
        return results

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
