"""Sampler overhead: time each sampler spends outside the network, relative to the network time.

The MNIST model of configs/mnist.yaml (1.1M parameters) at batch 64: every registered sampler
draws one batch through :func:`ddpmlab.samplers.generate.generate` (predictor, clipping,
sampler arithmetic, noise), with the network wrapped in a timer.  Overhead = (total time -
time inside the network) / time inside the network; the target is below 5 %.

    python benchmarks/sampler_overhead.py                 # ~1-2 minutes on 2 CPU cores
    python benchmarks/sampler_overhead.py --steps 100 --batch 256 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.config import load_config
from ddpmlab.data import data_shape
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.models import build_model
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.registry import SAMPLERS

CLOCK = time.perf_counter


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class TimedNetwork(torch.nn.Module):
    """The network with a stopwatch around each call: ``seconds`` inside it, ``calls`` made."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.seconds, self.calls = model, 0.0, 0

    def forward(self, x, t, y=None):
        device = x.device
        _sync(device)
        t0 = CLOCK()
        out = self.model(x, t, y)
        _sync(device)
        self.seconds += CLOCK() - t0
        self.calls += 1
        return out


def measure(name: str, net: TimedNetwork, schedule, shape, args) -> tuple:
    """(total seconds, network seconds, network calls) of the best of ``args.repeats`` runs."""
    best = None
    for _ in range(args.repeats):
        net.seconds, net.calls = 0.0, 0
        _sync(args.device)
        t0 = CLOCK()
        generate(net, schedule, shape, args.batch, sampler=name, steps=args.steps, clip_x0=1.0,
                 batch_size=args.batch, seed=0, device=args.device, progress=False)
        _sync(args.device)
        run = (CLOCK() - t0, net.seconds, net.calls)
        best = run if best is None or run[0] < best[0] else best
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2, help="runs per sampler (the fastest is kept)")
    p.add_argument("--samplers", nargs="+", default=list(SAMPLERS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: CPU seconds of this process (steadier on a shared machine; use with --threads 1)")
    args = p.parse_args(argv)
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu":
        CLOCK = time.process_time
    cfg = load_config("mnist")
    torch.manual_seed(0)
    model = build_model(cfg).to(args.device).eval()
    with torch.no_grad():  # trained-looking weights: a zero-initialised output layer would make x0 trivial
        for prm in model.parameters():
            prm.add_(torch.randn_like(prm) * 0.02)
    net = TimedNetwork(model)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    shape = data_shape(cfg)
    print(f"MNIST model ({sum(q.numel() for q in model.parameters()) / 1e6:.2f}M parameters), batch {args.batch}, "
          f"{args.steps} steps, {args.device}, {torch.get_num_threads()} threads, {args.clock} clock")
    generate(net, schedule, shape, 8, steps=2, batch_size=8, device=args.device, progress=False)  # warm-up
    head = (f"{'sampler':10} {'NFE':>5} {'total s':>8} {'network s':>9} {'ms/NFE':>7} {'outside ms/step':>15} "
            f"{'overhead':>8}")
    print(head + "\n" + "-" * len(head))
    for name in args.samplers:
        try:
            total, inside, calls = measure(name, net, schedule, shape, args)
        except Exception as e:  # a sampler that needs options this script does not give
            print(f"{name:10} n/a ({type(e).__name__}: {str(e).splitlines()[0][:80]})")
            continue
        outside = total - inside
        print(f"{name:10} {calls:5d} {total:8.2f} {inside:9.2f} {1e3 * inside / calls:7.1f} "
              f"{1e3 * outside / args.steps:15.2f} {100 * outside / inside:7.1f}%")
    print("\noverhead: time outside the network (predictor, clipping, sampler arithmetic, noise) / time inside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
