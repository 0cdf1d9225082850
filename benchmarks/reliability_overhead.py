"""What reliability costs: the non-finite step guard and the atomic checkpoint, side by side.

    python benchmarks/reliability_overhead.py            # the quick MNIST model (1.1M parameters)
    python benchmarks/reliability_overhead.py --steps 30 --saves 10

1. One training step of the MNIST config (batch 64, CPU) against the extra work the guard
   adds to it: the gradient-norm pass (``clip_grad_norm_`` with max_norm=inf when
   train.grad_clip=0) plus ``BadStepGuard.check`` (two ``isfinite`` reductions and one sync).
2. ``save_checkpoint`` (temporary folder, fsync of every file and folder, rename, ``latest``
   pointer) against writing the same three safetensors files directly, without fsync or
   rename: the price of a checkpoint that survives a crash.

Prints the times and their ratios; no assertions (speed is measured here, never in tests).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ddpmlab.config import load_config
from ddpmlab.diffusion.objectives import diffusion_loss, sample_timesteps
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.io.checkpoint import flatten_optimizer_state, save_checkpoint
from ddpmlab.models import build_model, count_parameters
from ddpmlab.training.guard import BadStepGuard


def _median(times: list) -> float:
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=15, help="timed training steps (default 15)")
    ap.add_argument("--saves", type=int, default=8, help="timed checkpoint saves (default 8)")
    args = ap.parse_args()

    cfg = load_config("mnist")
    torch.manual_seed(0)
    model = build_model(cfg)
    ema = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    x0 = torch.rand(cfg.train.batch_size, 1, 28, 28) * 2 - 1
    guard = BadStepGuard(cfg.train.max_bad_steps, say=lambda m: None)

    step_t, guard_t = [], []
    for step in range(args.steps + 2):  # the first two warm up
        t0 = time.perf_counter()
        t = sample_timesteps(x0.shape[0], schedule.num_timesteps)
        loss = diffusion_loss(model, schedule, x0, t=t, noise=torch.randn_like(x0))
        loss.backward()
        t1 = time.perf_counter()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
        ok = guard.check(step, loss, norm)
        t2 = time.perf_counter()
        if ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        if step >= 2:
            step_t.append(t3 - t0 - (t2 - t1))
            guard_t.append(t2 - t1)
    s, g = _median(step_t), _median(guard_t)
    print(f"model: {count_parameters(model) / 1e6:.2f}M parameters, batch {cfg.train.batch_size}, "
          f"{torch.get_num_threads()} threads, device cpu")
    print(f"training step (forward, backward, AdamW)   {s * 1e3:9.2f} ms")
    print(f"guard (grad norm + isfinite checks)        {g * 1e3:9.2f} ms   ratio {g / s:.4f} of a step")

    save_t, plain_t = [], []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for i in range(args.saves + 1):
            t0 = time.perf_counter()
            save_checkpoint(d / "atomic", i, model.state_dict(), ema.state_dict(), opt.state_dict(), keep=3)
            t1 = time.perf_counter()
            plain = d / "plain" / str(i)
            plain.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(plain / "model.safetensors"))
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(plain / "ema.safetensors"))
            save_file(flatten_optimizer_state(opt.state_dict())[0], str(plain / "optimizer.safetensors"))
            t2 = time.perf_counter()
            if i:
                save_t.append(t1 - t0)
                plain_t.append(t2 - t1)
        size = sum(f.stat().st_size for f in (d / "atomic" / "checkpoints" / f"step_{args.saves:07d}").iterdir())
    a, p = _median(save_t), _median(plain_t)
    print(f"checkpoint size                            {size / 1e6:9.2f} MB")
    print(f"plain save (3 safetensors, no fsync)       {p * 1e3:9.2f} ms")
    print(f"atomic save (tmp dir, fsync, rename)       {a * 1e3:9.2f} ms   ratio {a / p:.2f} x plain")
    print(f"atomic save every train.save_every={cfg.train.save_every} steps  "
          f"{a / (cfg.train.save_every * s):9.4f} of training time")


if __name__ == "__main__":
    main()
