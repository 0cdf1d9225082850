"""ODE error per NFE: every deterministic ddpmlab solver x step schedule, and diffusers' schedulers.

The model is the exact noise predictor of a Gaussian mixture (ddpmlab.diffusion.analytic.ExactDenoiser,
linear betas, T = 1000); every solver starts from the same x_T, and its output is compared sample by
sample with the exact probability-flow solution from that x_T (ddpmlab.evaluate.ode_error.reference_flow:
RK4 in log-sigma, 1,000 steps, checked against 2,000).  Printed: RMSE per coordinate per NFE, the
empirical order of convergence (minus the log-log slope over NFE >= 20, and over all NFE), and a plot of
error vs NFE on log axes for each target.

Targets: 'narrow' and 'wide' mixtures (mode std 0.02 / 0.3) in 2 dimensions (8 modes on the unit circle,
weights 1:...:8) and in 64 (16 modes uniform in [-1, 1]^64, the means of the sampler benchmark).

    python benchmarks/ode_error.py                                  # all four targets, NFE 5..100
    python benchmarks/ode_error.py --targets narrow2d --n 200 --nfe 5,10,20,50,100 --optimized-max-nfe 10
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ddpmlab.diffusion.analytic import ExactDenoiser, GaussianMixture
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.evaluate.bench import mixture2d, mixture64d
from ddpmlab.evaluate.ode_error import DIFFUSERS_SCHEDULERS, markdown, ode_errors, plot, to_json
from ddpmlab.samplers import ModelPredictor
from ddpmlab.samplers.registry import SAMPLER_SPECS, SAMPLERS
from ddpmlab.samplers.steps import optimize_timesteps

SOLVERS = ("ddim", "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc")


def _with_std(mix: GaussianMixture, std: float) -> GaussianMixture:
    return GaussianMixture(mix.means, std, mix.weights)


TARGETS = {
    "narrow2d": lambda: _with_std(mixture2d(), 0.02),
    "wide2d": lambda: _with_std(mixture2d(), 0.3),
    "narrow64d": lambda: _with_std(mixture64d(), 0.02),
    "wide64d": lambda: _with_std(mixture64d(), 0.3),
}


def entries(schedules=None):
    """Every deterministic solver with every step schedule it takes (``schedules``: only these names)."""
    out = []
    for name in SOLVERS:
        for ts in SAMPLER_SPECS[name].step_schedules:
            if schedules is None or ts in schedules:
                out.append(f"{name}:{ts}")
    return out


def best_per_solver(res) -> list:
    """For the plot: each ddpmlab solver with its best schedule (lowest mean log error), and diffusers' rows."""
    keep = []
    for name in SOLVERS:
        rows = [label for label in res.errors if label.split(":")[0] == name
                and len(res.errors[label]) == len(res.nfes)]
        if rows:
            keep.append(min(rows, key=lambda r: sum(torch.tensor(list(res.errors[r].values())).log().tolist())))
    return keep + [label for label in res.errors if label.startswith("diffusers")]


def run_target(name: str, args, log) -> str:
    mix = TARGETS[name]()
    schedule = NoiseSchedule.make("linear", 1000)
    model = ExactDenoiser(mix, schedule)
    predict = ModelPredictor(model, schedule, "eps")
    x_T = torch.randn(args.n, mix.dim, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
    x_cal = torch.randn(args.calibration, mix.dim, generator=torch.Generator().manual_seed(args.seed + 3),
                        dtype=torch.float64)  # other noise than x_T: the fitted schedule must not know it

    def calibrate(solver: str, nfe: int) -> torch.Tensor:
        return optimize_timesteps(predict, schedule, SAMPLERS[solver], nfe, x_cal)

    t0 = time.time()
    log(f"\n{name} ({mix.dim}-D, {len(mix.weights)} modes, std {float(mix.stds[0]):g}), n = {args.n}; "
        f"RMSE per NFE {args.nfes}")
    res = ode_errors(predict, schedule, x_T, entries(args.schedules), args.nfes, model=model,
                     diffusers=[] if args.no_diffusers else list(DIFFUSERS_SCHEDULERS),
                     reference_steps=args.reference_steps, calibrate=calibrate, target=name,
                     optimized_max_nfe=args.optimized_max_nfe, log=log)
    log(f"({time.time() - t0:.0f} s)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"ode_error_{name}.json").write_text(to_json(res))
    png = plot(res, out / f"ode_error_{name}.png", best_per_solver(res))
    log(f"wrote {png}")
    return f"### {name}\n\n" + markdown(res) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    p.add_argument("--nfe", default="5,10,20,50,100")
    p.add_argument("--n", type=int, default=1000, help="samples (default 1000)")
    p.add_argument("--reference-steps", type=int, default=1000, help="RK4 steps of the reference (default 1000)")
    p.add_argument("--schedules", default=None, help="only these step schedules (default: all a solver takes)")
    p.add_argument("--optimized-max-nfe", type=int, default=20,
                   help="fit the 'optimized' schedule only up to this NFE (default 20; it costs ~300 NFE per NFE)")
    p.add_argument("--calibration", type=int, default=256, help="calibration samples of 'optimized' (default 256)")
    p.add_argument("--no-diffusers", action="store_true", help="ddpmlab's solvers only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/ode-error", help="folder for ode_error.md and the .json/.png per target")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the work is many small ops)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.nfes = sorted({int(v) for v in args.nfe.split(",")})
    args.schedules = None if args.schedules is None else [s.strip() for s in args.schedules.split(",")]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    bad = [t for t in targets if t not in TARGETS]
    if bad:
        p.error(f"unknown target(s) {', '.join(bad)}; choose from {', '.join(TARGETS)}")
    text = "".join(run_target(t, args, lambda s: print(s, flush=True)) for t in targets)
    print("\n" + text)
    path = Path(args.out) / "ode_error.md"
    path.write_text(text)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
