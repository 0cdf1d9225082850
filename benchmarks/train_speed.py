"""Training speed: ddpmlab's UNet against diffusers' UNet2DModel of the same architecture.

One process, same machine, same batch, same training step (Ho et al. 2020, Algorithm 1:
q_sample, forward, L_simple, backward, AdamW).  Variants:

    diffusers fp32            UNet2DModel built by ddpmlab.io.diffusers_bridge.unet2d_config (same weights)
    ddpmlab fp32              our UNet, eager; both with torch's default (foreach) AdamW
    diffusers bf16            under torch.autocast(bfloat16): diffusers' best on a CPU
    ddpmlab bf16              the same for our UNet
    ddpmlab best              bf16 + fused AdamW: the model and optimizer `ddpm train train.mixed_precision=bf16` runs
    diffusers bf16+fused      reference: how much of "best" is the optimizer alone
    --channels-last, --compile  further ddpmlab variants (on this kind of CPU neither helps, and
                              torch.compile takes 3-7 minutes here, so they are opt-in)

Then, on a CPU, a second table from fresh processes, one per variant and round (what a new training
run sees): diffusers bf16 and ddpmlab best with glibc's default allocator, and both again with freed
memory kept in the process (ddpmlab.allocator, which `ddpm train` turns on for CPU runs).  In one
long-lived process glibc's adaptive thresholds end up keeping memory anyway, so the in-process table
cannot show this; the fresh processes count the page faults a step takes.

Attention: diffusers uses torch's scaled_dot_product_attention; ddpmlab too on GPUs, and on a
CPU two plain matrix products (faster there, see ddpmlab.models.fast_ops.attention).
Variants run interleaved in rounds, so a busy machine slows all alike; the table shows the
best round's images/s (as timeit: interference only slows a run down), the ratios to
diffusers, the FLOP per image (forward + backward, counted by torch's FlopCounterMode) and
the achieved GFLOP/s as a share of this machine's dense-product peak measured the same way
(best of matmul, 1x1 and 3x3 convolution; fp32 peak for fp32 runs, bf16 peak for bf16 runs).

    python benchmarks/train_speed.py                       # both models, ~5-10 min on 2 idle CPU cores
    python benchmarks/train_speed.py --threads 1 --clock cpu   # steadier on a shared machine
    python benchmarks/train_speed.py --models mnist --rounds 5
    python benchmarks/train_speed.py --device cuda --batch-cifar10 128 --batch-mnist 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

try:
    import resource
except ImportError:  # Windows
    resource = None

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.config import load_config
from ddpmlab.data import data_shape
from ddpmlab.diffusion.objectives import diffusion_loss
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.models import build_model
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.precision import resolve_precision

CLOCK = time.perf_counter  # --clock cpu: time.process_time (CPU seconds of this process; use with --threads 1)
MODELS = {"cifar10": ["data.dataset=folder", "data.path=x", "data.image_size=[32,32]", "data.channels=3"],
          "mnist": []}


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, seconds: float = 3.0) -> float:
    """The machine's dense-product peak in ``dtype``: best GFLOP/s of three kernels over ~``seconds``.

    torch.mm (BLAS, n x n x n), the same product as a 1x1 convolution and a 3x3 convolution
    (256 channels, 16x16, batch 8), both in oneDNN, the library that runs the UNets' convolutions.
    On some CPUs (AMD with MKL) the BLAS sgemm reaches half of what oneDNN does, so the best one
    stands for the peak.
    """
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    x1 = torch.randn(16, n, 8, n // 128, device=device).to(dtype)  # n pixels of n channels
    x3, w3 = torch.randn(8, 256, 16, 16, device=device).to(dtype), torch.randn(256, 256, 3, 3, device=device).to(dtype)
    kernels = [(lambda: torch.mm(a, b), 2 * n**3),
               (lambda: torch.nn.functional.conv2d(x1, b[:, :, None, None]), 2 * n**3),
               (lambda: torch.nn.functional.conv2d(x3, w3, padding=1), 2 * 8 * 256 * 256 * 9 * 16 * 16)]
    best = 0.0
    for fn, flop in kernels:
        fn()
        end = time.perf_counter() + seconds / len(kernels)
        while time.perf_counter() < end:
            _sync(device)
            t0 = CLOCK()
            fn()
            _sync(device)
            best = max(best, flop / (CLOCK() - t0) / 1e9)
    return best


def minor_faults() -> int:
    """Minor page faults of this process so far: fresh pages the kernel had to map (and zero) for it."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class DiffusersAdapter(torch.nn.Module):
    """UNet2DModel as a ddpmlab denoiser ``model(x_t, t, y) -> eps``."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, y=None):
        return self.unet(x, t, class_labels=y).sample


def build(which: str, name: str, device: str, channels_last: bool = False, compile: bool = False,
          fused: bool = False):
    cfg = load_config(name, MODELS[name])
    torch.manual_seed(0)
    if which == "ddpmlab":
        model = build_model(cfg)
    else:
        import diffusers

        from ddpmlab.io.diffusers_bridge import unet2d_config
        model = DiffusersAdapter(diffusers.UNet2DModel(**unet2d_config(cfg)))
    model = model.to(device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None)
    fn = torch.compile(model) if compile else model
    return cfg, model, fn, opt


class Variant:
    def __init__(self, label, which, name, batch, device, bf16=False, channels_last=False, compile=False,
                 fused=False):
        self.label, self.which, self.bf16, self.device, self.batch = label, which, bf16, device, batch
        self.channels_last = channels_last
        self.cfg, self.model, self.fn, self.opt = build(which, name, device, channels_last, compile, fused)
        self.schedule = NoiseSchedule.from_config(self.cfg.diffusion)
        g = torch.Generator().manual_seed(0)
        self.x0 = torch.randn(batch, *data_shape(self.cfg), generator=g).clamp(-1, 1).to(device)
        if channels_last:
            self.x0 = self.x0.contiguous(memory_format=torch.channels_last)
        self.rates, self.faults = [], []  # images/s and minor page faults per step, per measurement

    def step(self) -> None:
        t = torch.randint(0, self.schedule.num_timesteps, (self.batch,), device=self.device)
        noise = torch.randn_like(self.x0)
        ctx = torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with ctx:
            loss = diffusion_loss(self.fn, self.schedule, self.x0, t=t, noise=noise)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def measure(self, steps: int) -> float:
        _sync(self.device)
        faults, t0 = minor_faults(), CLOCK()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        rate = steps * self.batch / (CLOCK() - t0)
        self.rates.append(rate)
        self.faults.append((minor_faults() - faults) / steps)
        return rate


def flops_per_image(which: str, name: str, device: str) -> float:
    """FLOP of one training example, forward + backward, as FlopCounterMode counts them.

    ddpmlab's UNet runs its large upsampling convolutions in sub-pixel form (16/36 of the
    multiply-adds of conv3x3 after nearest x2), so it executes fewer FLOP for the same function.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg, model, fn, _ = build(which, name, device)
    x = torch.randn(2, *data_shape(cfg), device=device)
    t = torch.tensor([1, 500], device=device)
    with FlopCounterMode(display=False) as counter:
        model(x, t).pow(2).mean().backward()
    return counter.get_total_flops() / 2


def measure_rounds(variants, rounds: int, steps: int, tag: str = "") -> None:
    for v in variants:  # warm-up: allocator, oneDNN primitive caches
        v.step()
    for r in range(rounds):
        line = [f"{v.measure(steps):.2f}" for v in variants]
        print(f"  {tag}round {r + 1}: " + " ".join(line) + " img/s", flush=True)


def build_variants(name: str, batch: int, args) -> list:
    dev = args.device
    variants = [Variant("diffusers fp32", "diffusers", name, batch, dev),
                Variant("ddpmlab fp32", "ddpmlab", name, batch, dev),
                Variant("diffusers bf16", "diffusers", name, batch, dev, bf16=True),
                Variant("ddpmlab bf16", "ddpmlab", name, batch, dev, bf16=True),
                Variant("ddpmlab best (bf16+fused)", "ddpmlab", name, batch, dev, bf16=True, fused=True),
                Variant("diffusers bf16+fused", "diffusers", name, batch, dev, bf16=True, fused=True)]
    if args.channels_last:
        variants.append(Variant("ddpmlab best+channels_last", "ddpmlab", name, batch, dev, bf16=True, fused=True,
                                channels_last=True))
    if args.compile:
        try:
            best = Variant("ddpmlab best+compile", "ddpmlab", name, batch, dev, bf16=True, fused=True, compile=True)
            t0 = time.perf_counter()
            best.step()
            best.step()
            print(f"  torch.compile: {time.perf_counter() - t0:.0f} s to compile and warm up")
            variants.append(best)
        except Exception as e:  # compilers missing, unsupported ops, ...
            print(f"  torch.compile does not work here ({type(e).__name__}: {str(e).splitlines()[0][:100]}); skipped")
    return variants


# fresh processes: label, model, Variant options, keep freed memory (ddpmlab.training.allocator) from the start
FRESH = [("diffusers bf16", "diffusers", dict(bf16=True), False),
         ("ddpmlab best", "ddpmlab", dict(bf16=True, fused=True), False),
         ("ddpmlab best + kept memory", "ddpmlab", dict(bf16=True, fused=True), True),
         ("diffusers bf16 + kept memory", "diffusers", dict(bf16=True), True)]


def child(name: str, batch: int, index: int, args) -> None:
    """One FRESH variant alone in this (new) process, as a training script would run: JSON on the last line."""
    label, which, options, kept = FRESH[index]
    if kept:
        keep_freed_memory()  # as `ddpm train` does before it builds anything
    v = Variant(label, which, name, batch, args.device, **options)
    for _ in range(2):
        v.step()
    for _ in range(args.rounds):
        v.measure(args.steps)
    print(json.dumps({"rate": max(v.rates), "faults": min(v.faults)}))


def fresh_processes(name: str, batch: int, args, argv: list) -> list:
    """FRESH variants, each in its own new process, interleaved in rounds: (label, best img/s, fewest faults/step)."""
    results = {label: [] for label, *_ in FRESH}
    for r in range(args.rounds):
        line = []
        for i, (label, *_) in enumerate(FRESH):
            cmd = [sys.executable, __file__, *argv, "--child", name, str(batch), str(i), "--rounds", "2"]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[label].append(json.loads(out.strip().splitlines()[-1]))
            line.append(f"{results[label][-1]['rate']:.2f}")
        print(f"  round {r + 1}: " + " ".join(line) + " img/s", flush=True)
    return [(label, max(x["rate"] for x in res), min(x["faults"] for x in res)) for label, res in results.items()]


def table_rows(name: str, batch: int, variants: list, peaks, dev: str) -> list:
    flops = {which: flops_per_image(which, name, dev) for which in ("diffusers", "ddpmlab")}
    base = {False: max(variants[0].rates), True: max(variants[2].rates)}
    rows = []
    for v in variants:
        rate, flop = max(v.rates), flops[v.which]
        gflops = rate * flop / 1e9
        peak = peaks["bf16" if v.bf16 else "fp32"]
        rows.append((name, batch, v.label, rate, rate / base[False], rate / base[True], flop / 1e9, gflops,
                     100 * gflops / peak, min(v.faults)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["cifar10", "mnist"], choices=list(MODELS))
    p.add_argument("--batch-cifar10", type=int, default=16)
    p.add_argument("--batch-mnist", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds (the best is reported)")
    p.add_argument("--steps", type=int, default=2, help="training steps per measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: images per second (default); cpu: per CPU-second of this process, which other "
                        "processes on a shared machine disturb less (with --threads 1)")
    p.add_argument("--compile", action="store_true", help="add ddpmlab best + torch.compile (minutes to compile)")
    p.add_argument("--channels-last", action="store_true", help="add ddpmlab best + channels_last")
    p.add_argument("--no-fresh", action="store_true",
                   help="skip the fresh-process table (diffusers bf16 and ddpmlab best, with and without kept memory)")
    p.add_argument("--child", nargs=3, metavar=("MODEL", "BATCH", "INDEX"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    passed = ["--clock", args.clock, "--steps", str(args.steps), "--device", args.device]
    passed += ["--threads", str(args.threads)] if args.threads else []
    global CLOCK
    if args.clock == "cpu":
        if torch.get_num_threads() != 1 and args.threads != 1:
            p.error("--clock cpu counts the CPU seconds of all threads: use it with --threads 1")
        CLOCK = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, {args.clock} clock")
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if args.device == "cpu" and load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores: other processes share the CPU, the numbers are "
              "noisy (ratios between interleaved variants less so)")
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args)
        return 0
    peaks = {"fp32": matmul_peak(torch.float32, args.device), "bf16": matmul_peak(torch.bfloat16, args.device)}
    print(f"measured dense peak (best of matmul, 1x1 and 3x3 conv): fp32 {peaks['fp32']:.0f} GFLOP/s, "
          f"bf16 {peaks['bf16']:.0f} GFLOP/s")
    measured = {}
    for name in args.models:
        batch = getattr(args, f"batch_{name}")
        print(f"{name}: batch {batch}, {args.rounds} rounds of {args.steps} steps, glibc's default allocator "
              "(columns: the variants in the order of the table below)")
        measured[name] = build_variants(name, batch, args)
        measure_rounds(measured[name], args.rounds, args.steps)
    rows = []
    for name, variants in measured.items():
        rows += table_rows(name, getattr(args, f"batch_{name}"), variants, peaks, args.device)
    print()
    head = (f"{'model':8} {'batch':>5}  {'variant':28} {'img/s':>7} {'vs diff fp32':>12} {'vs diff bf16':>12} "
            f"{'GFLOP/img':>9} {'GFLOP/s':>8} {'% peak':>6} {'faults/step':>11}")
    print(head)
    print("-" * len(head))
    auto, why = resolve_precision("auto", torch.device(args.device).type)
    for name, batch, label, rate, r32, r16, gf, gfs, pct, faults in rows:
        picked = label == ("ddpmlab best (bf16+fused)" if auto == "bf16" else "ddpmlab fp32")
        print(f"{name:8} {batch:>5}  {label + (' <- auto' if picked else ''):28} {rate:7.2f} {r32:11.2f}x "
              f"{r16:11.2f}x {gf:9.2f} {gfs:8.1f} {pct:5.0f}% {faults:11.0f}")
    print(f"\n'<- auto': what `ddpm train` runs with train.mixed_precision=auto here: "
          f"{'bf16' if auto == 'bf16' else 'fp32'} ({why}); `ddpm train` also fuses AdamW.")
    print("\n% peak: achieved GFLOP/s over the measured dense-product peak of the same precision (fp32 or bf16); "
          "'best': bf16 autocast + fused AdamW; faults/step: fewest minor page faults of a measured step (fresh "
          "pages from the kernel).")
    if args.device != "cpu" or args.no_fresh:
        return 0
    print("\nFresh processes (what a new training run sees; glibc's default allocator gives memory back, and "
          "ddpm train keeps it, ddpmlab.training.allocator): each variant alone in a new process, interleaved in rounds")
    rows = []
    for name in args.models:
        batch = getattr(args, f"batch_{name}")
        print(f"{name}: batch {batch} (columns: {', '.join(label for label, *_ in FRESH)})")
        rows += [(name, batch, *row) for row in fresh_processes(name, batch, args, passed)]
    print(f"\n{'model':8} {'batch':>5}  {'variant (fresh process)':28} {'img/s':>7} {'vs diff bf16':>12} {'faults/step':>11}")
    for name, batch, label, rate, faults in rows:
        base = next(r for n, _, lab, r, _ in rows if n == name and lab == "diffusers bf16")
        print(f"{name:8} {batch:>5}  {label:28} {rate:7.2f} {rate / base:11.2f}x {faults:11.0f}")
    for name in args.models:
        rate = {lab: r for n, _, lab, r, _ in rows if n == name}
        print(f"{name}: like for like, both with kept memory: ddpmlab best / diffusers bf16 = "
              f"{rate['ddpmlab best + kept memory'] / rate['diffusers bf16 + kept memory']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
