"""Reflow's training data: (noise, sample) pairs of a teacher flow's ODE, the coupling (Z_0, Z_1) that reflow
straightens (Liu et al. 2023, Algorithm 1), drawn once into the run folder.

    RUN/pairs/chunk_000000.safetensors   noise z (n, ...), sample x (n, ...) and, for a class-conditional
                                         teacher, label (n,); metadata: how they were drawn

Chunk k holds pairs k * reflow.chunk and on, written whole or not at all (:mod:`ddpmlab.atomic`), so a crash
loses at most the chunk being drawn and a resumed run draws only the chunks that are missing.  Chunk k's noise
comes from (train.seed, k) and the sampler is deterministic, so a redrawn chunk equals the lost one.  Pair i
of a class-conditional teacher has class i mod K (its classes cycle as a run's own samples do) and keeps it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.config import Config
from ddpmlab.errors import OPTION, ConfigError, DDPMError, OptionError
from ddpmlab.progress import progress_bar
from ddpmlab.runs import Run, SamplingPlan, SamplingRequest, own_sampler, plan_request
from ddpmlab.samplers.base import ModelPredictor
from ddpmlab.samplers.registry import get_spec

PAIRS_DIR = "pairs"
DRAW_BATCH = 256  # pairs per sampler call
# how a reflow run's config names the options of the teacher's sampling
PAIR_OPTIONS = {"sampler": "reflow.sampler", "steps": "reflow.steps", "guidance": "reflow.guidance"}


def pair_sampling(cfg: Config, teacher_cfg: Config) -> Tuple[str, int, Optional[float]]:
    """(sampler, steps, guidance) of the pairs: reflow.sampler, steps and guidance, each where it is null the
    teacher's own (train.sample_sampler or its process's, train.sample_steps, train.sample_guidance)."""
    rf = cfg.reflow
    guidance = rf.guidance
    if guidance is None and teacher_cfg.model.num_classes:
        guidance = teacher_cfg.train.sample_guidance
    return rf.sampler or own_sampler(teacher_cfg), rf.steps or teacher_cfg.train.sample_steps, guidance


def pair_plan(teacher: Run, cfg: Config) -> SamplingPlan:
    """The teacher's ODE sampler call that draws the pairs (guided as the pairs' guidance says); a stochastic
    sampler, bad steps or guidance are refused, named as reflow.* names them."""
    sampler, steps, guidance = pair_sampling(cfg, teacher.cfg)
    with pair_names():
        if get_spec(sampler).stochastic:
            raise OptionError("sampler", f"{OPTION} {sampler} draws fresh noise while it samples; reflow pairs "
                                         "each noise with the end of its ODE path: take flow_euler, flow_heun, "
                                         "flow_midpoint, ddim, dpmpp_2m, ...")
        return plan_request(teacher, SamplingRequest(sampler, steps, guidance=guidance), log=lambda m: None)


def chunk_path(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / PAIRS_DIR / f"chunk_{k:06d}.safetensors"


def chunk_rows(cfg: Config, k: int) -> range:
    """The pair indices of chunk k."""
    rf = cfg.reflow
    return range(k * rf.chunk, min((k + 1) * rf.chunk, rf.pairs))


def chunk_count(cfg: Config) -> int:
    return -(-cfg.reflow.pairs // cfg.reflow.chunk)


def chunk_metadata(cfg: Config, plan: SamplingPlan, k: int) -> Dict[str, str]:
    """What chunk k records of how it was drawn (checked when it is read back)."""
    rows = chunk_rows(cfg, k)
    return {"first": str(rows.start), "count": str(len(rows)), "seed": str(cfg.train.seed), "sampler": plan.sampler,
            "steps": str(plan.steps), "guidance": str(plan.guidance)}


def teacher_ode(teacher: Run, plan: SamplingPlan, z: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
    """The end x (B, ...) float32 on the CPU of the teacher's ODE path from noise z (B, ...), class y (B,) or None."""
    y = None if y is None else y.to(teacher.device)
    predict = ModelPredictor(plan.model, teacher.schedule, teacher.cfg.diffusion.prediction, y=y,
                             clip_x0=teacher.clip_x0)
    x = plan.spec.fn(predict, teacher.schedule, z.to(teacher.device), plan.steps, **plan.options)
    return x.float().cpu()


def chunk_labels(teacher: Run, rows: range) -> Optional[torch.Tensor]:
    return torch.arange(rows.start, rows.stop) % teacher.num_classes if teacher.num_classes else None


@torch.no_grad()
def draw_pairs(teacher: Run, plan: SamplingPlan, cfg: Config, run_dir: Path, *, rank: int = 0, world: int = 1,
               progress: bool = True) -> int:
    """Draw this process's missing chunks (chunk k is process k mod ``world``'s) into RUN/pairs; the pairs drawn."""
    missing = [k for k in range(chunk_count(cfg)) if not chunk_path(run_dir, k).is_file()]
    todo = [k for k in missing if k % world == rank]
    if not todo:
        return 0
    left = sum(len(chunk_rows(cfg, k)) for k in missing)
    bar = progress_bar(progress, total=cfg.reflow.pairs, initial=cfg.reflow.pairs - left, unit="pair",
                       desc=f"reflow pairs ({plan.describe()})")
    drawn = 0
    was_training = plan.model.training
    plan.model.eval()
    try:
        for k in todo:
            rows = chunk_rows(cfg, k)
            gen = torch.Generator().manual_seed(cfg.train.seed * 1_000_003 + k)
            z = torch.randn((len(rows), *teacher.shape), generator=gen)
            y = chunk_labels(teacher, rows)
            parts = []
            for i in range(0, len(rows), DRAW_BATCH):
                part = slice(i, i + DRAW_BATCH)
                parts.append(teacher_ode(teacher, plan, z[part], None if y is None else y[part]))
                bar.update(len(parts[-1]))
            tensors = {"noise": z, "sample": torch.cat(parts), **({} if y is None else {"label": y})}
            atomic_save_tensors(tensors, chunk_path(run_dir, k), metadata=chunk_metadata(cfg, plan, k))
            drawn += len(rows)
    finally:
        bar.close()
        plan.model.train(was_training)
    return drawn


class PairDataset(torch.utils.data.Dataset):
    """The pairs as training examples: item i is (x_i, z_i, label_i) (label 0 for an unconditional teacher)."""

    def __init__(self, sample: torch.Tensor, noise: torch.Tensor, label: Optional[torch.Tensor]):
        self.sample, self.noise = sample, noise
        self.label = torch.zeros(len(sample), dtype=torch.long) if label is None else label.long()

    def __len__(self) -> int:
        return len(self.sample)

    def __getitem__(self, i: int):
        return self.sample[i], self.noise[i], self.label[i]


def load_pairs(cfg: Config, plan: SamplingPlan, run_dir: Path, shape: tuple) -> PairDataset:
    """Every chunk of RUN/pairs, checked against how this run draws them (``plan``) and the sample ``shape``."""
    parts = []
    for k in range(chunk_count(cfg)):
        path = chunk_path(run_dir, k)
        fix = f"delete it and continue with `ddpm reflow --resume {run_dir}` (it is drawn again)"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path))
        except (OSError, ValueError, RuntimeError) as e:  # a missing or unreadable file
            raise DDPMError(f"{path} cannot be read ({type(e).__name__}: {' '.join(str(e).split())[:120]}); "
                            f"{fix}") from None
        want = chunk_metadata(cfg, plan, k)
        diff = [f"{key} {meta.get(key)!r} (the run's: {value!r})" for key, value in want.items()
                if meta.get(key) != value]
        if diff or tuple(tensors["sample"].shape) != (len(chunk_rows(cfg, k)), *shape):
            raise DDPMError(f"{path} holds other pairs than this run draws ({', '.join(diff) or 'another shape'}); "
                            f"{fix}")
        parts.append(tensors)
    cat = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    return PairDataset(cat["sample"], cat["noise"], cat.get("label"))


@contextlib.contextmanager
def pair_names():
    """An error about a sampling option, named as a reflow run's config names it (reflow.*)."""
    try:
        yield
    except OptionError as e:
        raise ConfigError(e.named(PAIR_OPTIONS)) from None
