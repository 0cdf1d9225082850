"""Sampler accuracy per NFE: ddpmlab's solvers vs diffusers' schedulers on exact Gaussian-mixture scores.

Both sides drive the same model, ddpmlab.diffusion.analytic.ExactDenoiser (the exact eps* of a Gaussian
mixture under linear betas, T = 1000), from the same x_T; each output set is compared with exact
samples by the sliced Wasserstein-2 distance, printed as a multiple of the two-sample floor
(the mean distance of independent exact sets to the same reference: 1.0 = as good as it gets).

diffusers: DDIMScheduler (clip_sample off: the data exceed [-1, 1]), DPMSolverMultistepScheduler
(solver_order 2 and 3), UniPCMultistepScheduler (bh2, order 2); each DPM/UniPC also with
use_karras_sigmas=True (DDIMScheduler has no such option); otherwise their defaults.
ddpmlab: every solver with its step schedules, including the model-optimised one (fitted on
calibration noise other than the evaluation noise).

    python benchmarks/sampler_accuracy.py                 # both targets, NFE 5 10 20 50 (~10 min on 2 cores)
    python benchmarks/sampler_accuracy.py --target mixture2d --n 5000 --markdown out.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ddpmlab.diffusion.analytic import ExactDenoiser
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.evaluate.bench import ANALYTIC_TARGETS, BenchEntry, markdown_table, run_bench, sliced_w2
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.registry import SAMPLERS
from ddpmlab.samplers.steps import optimize_timesteps

OURS = ["ddim", "euler:karras", "heun:karras", "pc",
        "dpmpp_2m:logsnr", "dpmpp_2m:karras", "dpmpp_2m:optimized",
        "dpmpp_3m:logsnr", "dpmpp_3m:karras", "dpmpp_3m:optimized",
        "unipc:logsnr", "unipc:karras", "unipc:optimized"]


def diffusers_configs():
    import diffusers

    dpm, uni = diffusers.DPMSolverMultistepScheduler, diffusers.UniPCMultistepScheduler
    return {
        "DDIM": (diffusers.DDIMScheduler, {"clip_sample": False}),
        "DPM++2M": (dpm, {"solver_order": 2}),
        "DPM++2M karras": (dpm, {"solver_order": 2, "use_karras_sigmas": True}),
        "DPM++3M": (dpm, {"solver_order": 3}),
        "DPM++3M karras": (dpm, {"solver_order": 3, "use_karras_sigmas": True}),
        "UniPC": (uni, {}),
        "UniPC karras": (uni, {"use_karras_sigmas": True}),
    }


def diffusers_sample(cls, config: dict, model, x_T: torch.Tensor, nfe: int) -> torch.Tensor:
    sched = cls(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, **config)
    sched.set_timesteps(nfe)
    x = x_T.clone()
    for t in sched.timesteps:  # one model evaluation per step for all four schedulers
        x = sched.step(model(x, t), t, x).prev_sample
    return x.double()


def run_target(name: str, nfes, n: int, seed: int, log) -> str:
    mix = ANALYTIC_TARGETS[name]()
    schedule = NoiseSchedule.make("linear", 1000)
    model = ExactDenoiser(mix, schedule)
    predict = ModelPredictor(model, schedule, "eps")
    x_T = torch.randn(n, mix.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x_cal = torch.randn(1000, mix.dim, generator=torch.Generator().manual_seed(seed + 3), dtype=torch.float64)
    reference = mix.sample(n, torch.Generator().manual_seed(seed + 1))
    floor_sets = [mix.sample(n, torch.Generator().manual_seed(seed + 100 + k)) for k in range(8)]

    def ours(spec: BenchEntry, nfe: int, options: dict) -> torch.Tensor:
        return SAMPLERS[spec.name](predict, schedule, x_T, nfe, generator=torch.Generator().manual_seed(seed + 4),
                                   **options)

    def calibrate(spec: BenchEntry, nfe: int) -> torch.Tensor:
        return optimize_timesteps(predict, schedule, SAMPLERS[spec.name], nfe, x_cal)

    t0 = time.time()
    log(f"\n{name} ({mix.dim}-D, {len(mix.weights)} modes), n = {n}; error / floor per NFE {list(nfes)}")
    log("ddpmlab:")
    res = run_bench(name, ours, reference, floor_sets, [BenchEntry.parse(s) for s in OURS], nfes, calibrate, log)
    log("diffusers:")
    theirs = {}
    for label, (cls, config) in diffusers_configs().items():
        theirs[label] = {k: sliced_w2(diffusers_sample(cls, config, model, x_T, k), reference) for k in nfes}
        log(f"  {label:<22}" + " ".join(f"{theirs[label][k] / res.floor:8.2f}" for k in nfes))
    log(f"({time.time() - t0:.0f} s)")
    return summary(res, theirs)


def summary(res, theirs: dict) -> str:
    """Markdown: one table with both sides, then best vs best and their ratio per NFE."""
    ours_labels = list(res.errors)
    for label, errs in theirs.items():
        res.errors[f"diffusers {label}"] = errs
    table = markdown_table(res)
    best_o = {k: min(res.errors[s][k] for s in ours_labels) for k in res.nfes}
    best_t = {k: min(theirs[s][k] for s in theirs) for k in res.nfes}
    arg_o = {k: min(ours_labels, key=lambda s: res.errors[s][k]) for k in res.nfes}
    arg_t = {k: min(theirs, key=lambda s: theirs[s][k]) for k in res.nfes}
    lines = ["| NFE | ddpmlab best | diffusers best | ratio (ours / theirs) |", "|---:|---|---|---:|"]
    for k in res.nfes:
        lines.append(f"| {k} | {best_o[k] / res.floor:.2f} ({arg_o[k]}) | {best_t[k] / res.floor:.2f} ({arg_t[k]}) "
                     f"| {best_o[k] / best_t[k]:.3f} |")
    return f"### {res.target}\n\n" + table + "\n" + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", choices=[*ANALYTIC_TARGETS, "all"], default="all")
    p.add_argument("--nfe", default="5,10,20,50")
    p.add_argument("--n", type=int, default=20000, help="samples per set (default 20000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--markdown", help="also write the tables to this file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the work is many small ops)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    nfes = [int(v) for v in args.nfe.split(",")]
    targets = list(ANALYTIC_TARGETS) if args.target == "all" else [args.target]
    out = [run_target(t, nfes, args.n, args.seed, lambda s: print(s, flush=True)) for t in targets]
    text = "\n".join(out)
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
