"""Seed 004: learned variances on 2-D toy data, against the fixed-variance baseline.

For each toy set (swiss roll, moons, S-curve) two MLPs with the same budget (steps,
batch, learning rate, network):

  hybrid  configs/toy2d_learned.yaml: variance learned_range, L_simple + 0.001 L_vlb
  simple  configs/toy2d.yaml:         L_simple, fixed variance

and two measurements:

  NLL     the variational bound on 5,000 fresh points (continuous decoder: differential
          bits/dim; lower is better); the simple model with both fixed variances
  quality 50 respaced DDPM steps, --n-samples samples per seed, mean over --seeds seeds:
          sliced Wasserstein distance to as many fresh data points (next to the data-vs-data
          floor), MMD on 2,000 of them, precision (mean distance of a sample to the nearest of
          20,000 fresh data points) and coverage (mean distance of a data point to the
          nearest sample)

plus the forward / reverse figures (forward_reverse_<set>.png).  Results go to
OUT/results.json and a table on stdout.

    python benchmarks/learned_variance_toy.py                 # ~25 min on 2 CPU cores
    python benchmarks/learned_variance_toy.py --steps 500 --datasets moons   # a quick look
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ddpmlab.config import load_config
from ddpmlab.data import make_toy
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.evaluate.nll import nll_bits_per_dim
from ddpmlab.evaluate.toy import mmd_rbf, sliced_wasserstein
from ddpmlab.io.checkpoint import load_model
from ddpmlab.samplers.generate import generate
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.viz.toy_figures import forward_points, reverse_points, save_panels


def train_pair(name: str, out: Path, steps: int, seed: int) -> dict:
    runs = {}
    for kind, config in (("hybrid", "toy2d_learned"), ("simple", "toy2d")):
        run = out / f"{name}-{kind}"
        if not (run / "checkpoints").is_dir():
            cfg = load_config(config, [f"data.toy={name}", f"train.steps={steps}", f"train.seed={seed}",
                                       f"train.out_dir={out}", f"train.name={name}-{kind}",
                                       f"train.save_every={steps}", "train.sample_n=1000"])
            t0 = time.time()
            train(cfg, progress=False)
            print(f"  trained {run.name} in {time.time() - t0:.0f} s", flush=True)
        runs[kind] = run
    return runs


def nll(run: Path, variance: str, x: torch.Tensor) -> float:
    cfg, model = load_model(run)
    s = NoiseSchedule.from_config(cfg.diffusion)
    r = nll_bits_per_dim(model, s, x, prediction=cfg.diffusion.prediction, variance=variance,
                         decoder="continuous", batch_size=5000, progress=False)
    return r.bits_per_dim


def nn_distances(x: torch.Tensor, dense: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Distance from each point of x (N, 2) to its nearest point of ``dense``: (N,)."""
    return torch.cat([torch.cdist(c, dense).min(1).values for c in x.split(chunk)])


FAR = 1.0  # a sample farther than this from every data point is a stray (the data span about 4 x 3)


def quality(run: Path, variance: str, fresh: list, dense: torch.Tensor, steps: int) -> dict:
    """Sample-quality numbers of ``steps``-step DDPM sampling, mean over the fresh reference sets.

    Strays (rare blow-ups of the MLP far outside the data, the same x_T for every variance)
    are counted and left out of SW, which squares distances; MMD keeps them.
    precision: mean distance sample -> data; coverage: mean distance data -> samples.
    """
    cfg, model = load_model(run)
    s = NoiseSchedule.from_config(cfg.diffusion)
    rows = []
    for k, ref in enumerate(fresh):
        x = generate(model, s, (2,), len(ref), sampler="ddpm", steps=steps, clip_x0=None, seed=1000 + k,
                     progress=False, variance=variance)
        d = nn_distances(x, dense)
        keep = x[d <= FAR]
        rows.append([sliced_wasserstein(keep, ref, generator=torch.Generator().manual_seed(k)),
                     mmd_rbf(x[:2000], ref[:2000]), float(d[d <= FAR].mean()),
                     float(nn_distances(ref[:5000], keep).mean()), float((d > FAR).sum())])
    t = torch.tensor(rows, dtype=torch.float64)
    m, se = t.mean(0), t.std(0) / len(t) ** 0.5
    return {"sw": float(m[0]), "sw_se": float(se[0]), "sw_all": t[:, 0].tolist(), "mmd": float(m[1]),
            "mmd_se": float(se[1]), "precision": float(m[2]), "coverage": float(m[3]), "strays": float(t[:, 4].sum()),
            "n": len(fresh) * len(fresh[0])}


def paired(a: dict, b: dict) -> tuple:
    """Mean and standard error of SW(a) - SW(b) over the shared seeds (same x_T, same reference)."""
    d = torch.tensor(a["sw_all"]) - torch.tensor(b["sw_all"])
    return float(d.mean()), float(d.std() / len(d) ** 0.5)


def figures(name: str, runs: dict, out: Path, steps: int) -> Path:
    cfg, model = load_model(runs["hybrid"])
    s = NoiseSchedule.from_config(cfg.diffusion)
    x0 = make_toy(name, 2000, seed=7)
    fwd = forward_points(s, x0, [-1, 49, 99, 249, 499, 999], generator=torch.Generator().manual_seed(0))
    rows = [("forward q(x_t | x_0)", fwd),
            (f"reverse, learned, {steps} steps", reverse_points(model, s, 2000, steps, "learned_range")),
            (f"reverse, fixed small, {steps} steps", reverse_points(model, s, 2000, steps, "fixed_small"))]
    return save_panels(rows, out / f"forward_reverse_{name}.png", reference=x0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="swiss_roll,moons,s_curve")
    p.add_argument("--steps", type=int, default=3000, help="training steps of every model (default 3000)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--seeds", type=int, default=5, help="sample sets per sliced-Wasserstein mean")
    p.add_argument("--n-samples", type=int, default=10000, help="samples (and fresh data points) per set")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/learned-variance-toy")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = {}
    for name in args.datasets.split(","):
        print(f"{name}:", flush=True)
        runs = train_pair(name, out, args.steps, args.seed)
        test = make_toy(name, 5000, seed=12345)
        n = args.n_samples
        fresh = [make_toy(name, n, seed=20000 + k) for k in range(args.seeds)]
        floor = [sliced_wasserstein(make_toy(name, n, seed=30000 + k), ref,
                                    generator=torch.Generator().manual_seed(k)) for k, ref in enumerate(fresh)]
        dense = make_toy(name, 20000, seed=40000)
        q = {key: quality(runs[kind], var, fresh, dense, args.sample_steps) for key, kind, var in (
            ("hybrid, learned", "hybrid", "learned_range"), ("hybrid, fixed small", "hybrid", "fixed_small"),
            ("simple, fixed small", "simple", "fixed_small"), ("simple, fixed large", "simple", "fixed_large"))}
        r = {
            "nll_bits_per_dim": {"hybrid, learned": nll(runs["hybrid"], "learned_range", test),
                                 "simple, fixed large": nll(runs["simple"], "fixed_large", test),
                                 "simple, fixed small": nll(runs["simple"], "fixed_small", test)},
            f"quality_{args.sample_steps}_steps": q,
            "sw_learned_minus_fixed_small_same_model": paired(q["hybrid, learned"], q["hybrid, fixed small"]),
            "sw_data_vs_data": float(torch.tensor(floor).mean()),
            "precision_data_vs_data": float(nn_distances(fresh[0], dense).mean()),
            "figure": str(figures(name, runs, out, args.sample_steps)),
        }
        results[name] = r
        for key, val in r["nll_bits_per_dim"].items():
            print(f"  NLL  {key:22s} {val:8.3f} bits/dim")
        for key, val in r[f"quality_{args.sample_steps}_steps"].items():
            print(f"  {key:22s} SW {val['sw']:.4f} +- {val['sw_se']:.4f}  MMD {val['mmd']:.5f} +- {val['mmd_se']:.5f}"
                  f"  precision {val['precision']:.4f}  coverage {val['coverage']:.4f}  strays {val['strays']:.0f}")
        d, se = r["sw_learned_minus_fixed_small_same_model"]
        print(f"  SW   learned - fixed small (hybrid model, paired) {d:+.4f} +- {se:.4f}")
        print(f"  data vs data           SW {r['sw_data_vs_data']:.4f}  precision {r['precision_data_vs_data']:.4f}",
              flush=True)
    meta = {"steps": args.steps, "sample_steps": args.sample_steps, "seeds": args.seeds, "n_samples": args.n_samples,
            "train_seed": args.seed}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
