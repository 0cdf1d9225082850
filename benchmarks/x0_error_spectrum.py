"""Where a trained model's x0 estimate goes wrong: per noise level, the error of its image mean (DC) and the rest.

    python benchmarks/x0_error_spectrum.py RUN [RUN ...] [--n 500]

For held-out MNIST test digits x0 and fixed noise eps, each run's network predicts x0_hat from
x_t = sqrt(abar) x0 + sqrt(1 - abar) eps at log-SNR levels from -8 to 8 (a flow run is called through
the exact change of variables, so the runs are compared at equal signal-to-noise ratio), with the
digits' own labels for class-conditional runs.  Printed per level: the RMS error of x0_hat, split
into the error of each image's mean brightness (the DC component: a grey cast) and what remains
(the shapes), and the x0 error's share that is DC.  A model that fails to learn the image's mean at
the high noise levels, where sampling decides it, shows a large DC error there.
"""

from __future__ import annotations

import argparse
import math

import torch

from ddpmlab.data import load_mnist
from ddpmlab.diffusion.process import q_sample
from ddpmlab.runs import load_run
from ddpmlab.samplers.base import ModelPredictor

LOG_SNRS = (-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0)


@torch.no_grad()
def errors(run_dir: str, x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor) -> dict:
    """{log-SNR: (rms, dc_rms, rest_rms)} of the run's x0 estimate."""
    run = load_run(run_dir, "ema", "cpu")
    abar = run.schedule.alphas_cumprod.double()
    out = {}
    for lam in LOG_SNRS:
        target = 1.0 / (1.0 + math.exp(-lam))  # abar of log-SNR lam: log(abar / (1 - abar)) = lam
        t = int((abar - target).abs().argmin())
        labels = y if run.num_classes else None
        predict = ModelPredictor(run.model, run.schedule, run.cfg.diffusion.prediction, y=labels)
        tt = torch.full((len(x0),), t, dtype=torch.long)
        _, x0_hat = predict(q_sample(run.schedule, x0, tt, noise), tt)
        err = (x0_hat.clamp(-1, 1) - x0).flatten(1)
        dc = err.mean(1, keepdim=True)
        out[lam] = (err.pow(2).mean().sqrt().item(), dc.pow(2).mean().sqrt().item(),
                    (err - dc).pow(2).mean().sqrt().item())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--n", type=int, default=500)
    args = p.parse_args()
    x, y = load_mnist("test")
    x0, y = x[:args.n], y[:args.n]
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    results = {run: errors(run, x0, y, noise) for run in args.runs}
    print("x0 error of each run (RMS on the [-1, 1] scale): total / image mean (DC) / the rest; DC share of the "
          "squared error")
    print(f"{'log-SNR':>8} " + " ".join(f"{run[-24:]:>34}" for run in args.runs))
    for lam in LOG_SNRS:
        cells = [f"{r[lam][0]:.3f} / {r[lam][1]:.3f} / {r[lam][2]:.3f} ({r[lam][1] ** 2 / r[lam][0] ** 2:4.0%})"
                 for r in results.values()]
        print(f"{lam:>8.0f} " + " ".join(f"{c:>34}" for c in cells))


if __name__ == "__main__":
    main()
