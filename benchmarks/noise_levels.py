"""Why deterministic solvers leave noise in samples of a trained model: error and gain per noise level.

For one pixel-space run of digit images (the bundled MNIST, or a 1-channel digit folder run), three
measurements (ddpmlab.evaluate.noise_levels), the run's own guidance scale throughout:

1. The model, per timestep: on --data-n held-out test digits and as many training digits (with their
   labels), noised with the same eps, the eps MSE, the x0 RMSE and the orthogonality defect
   2 E[eps_hat . (eps_hat - eps)] per pixel, 0 for the Bayes-optimal denoiser at every level:
   > 0 the model predicts more noise than there is, < 0 less (it leaves noise in).
2. The samplers, per model evaluation: the gain of an x0 error made at that evaluation only (RMS 0.01,
   the same direction for all), i.e. how much of it is still in the final sample, averaged over
   --gain-n samples from the same x_T and noise draws; for --samplers at --steps.
3. Where noise injection matters: DPM-Solver++(2M) SDE at --steps with the SDE only on steps
   starting below sigma (s_tmax) or only above it (s_tmin), the ODE elsewhere, each scored on --n
   samples with the shipped MNIST classifier (classifier-FID against the 500 test digits, confident
   share) and, as `ddpm eval --metrics judge,clean,rough` reports them
   (ddpmlab.evaluate.judges.digit_quality), the honest confident share of the digit judge and its
   ratio to the real test digits', the clean-background share and the rough share (samples rougher
   than every real test digit).

Writes noise_levels.md / .json and noise_levels.png (defect and gains against sigma) to --out.

    python benchmarks/noise_levels.py runs/mnist-20261201-120000
    python benchmarks/noise_levels.py RUN --windows 0.1,0.5,2 --n 300 --samplers ddim,dpmpp_2m_sde
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fast_samplers import at_size
from quality_per_minute import QUALITY_HEAD, cpu_name, quality_cells, score

from ddpmlab.data import load_mnist
from ddpmlab.evaluate.features import batches, classifier_extractor, extract
from ddpmlab.evaluate.judges import digit_quality, to_digit_size
from ddpmlab.evaluate.noise_levels import denoising_errors, error_gains
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request, run_guidance
from ddpmlab.samplers import ModelPredictor

LEVELS = [0, 2, 5, 10, 20, 35, 50, 75, 100, 150, 200, 300, 400, 500, 600, 700, 800, 900, 999]


def _digits(split: str, n: int, shape) -> tuple:
    x, y = load_mnist(split)
    return at_size(x[:n], shape), y[:n]


def model_errors(run, guidance, n: int):
    """{split: [LevelError]} on n test and n training digits with their labels."""
    plan = plan_request(run, SamplingRequest("ddim", 1, guidance=guidance, n=n), log=lambda m: None)
    out = {}
    for split in ("test", "train"):
        x0, y = _digits(split, n, run.shape)
        make = (lambda rows, y=y: ModelPredictor(plan.model, run.schedule, run.cfg.diffusion.prediction,
                                                 y=y[rows] if run.num_classes else None))
        out[split] = denoising_errors(None, run.schedule, x0, LEVELS, seed=0, make_predict=make)
    return out


def sampler_gains(run, guidance, sampler: str, steps: int, n: int):
    plan = plan_request(run, SamplingRequest(sampler, steps, guidance=guidance, n=n), log=lambda m: None)
    predict = ModelPredictor(plan.model, run.schedule, run.cfg.diffusion.prediction, y=plan.labels,
                             clip_x0=run.clip_x0)
    x_T = torch.randn((n, *run.shape), generator=torch.Generator().manual_seed(7))
    return error_gains(plan.spec.fn, predict, run.schedule, x_T, plan.steps, size=0.01, seed=0, **plan.options)


def window_rows(run, guidance, steps: int, n: int, windows, extractor, real_feats, real: torch.Tensor, seed: int):
    jobs = [("ODE (eta 0)", {"eta": 0.0}), ("SDE everywhere", {})]
    jobs += [(f"SDE below sigma {w:g}", {"s_tmax": w}) for w in windows]
    jobs += [(f"SDE above sigma {w:g}", {"s_tmin": w}) for w in windows]
    rows = []
    for name, options in jobs:
        t0 = time.perf_counter()
        plan = plan_request(run, SamplingRequest("dpmpp_2m_sde", steps, options=options, guidance=guidance, seed=seed,
                                                 n=n), log=lambda m: None)
        x = draw_samples(run, plan, n, seed=seed, progress=False)
        r = score(to_digit_size(x), extractor, real_feats)
        r.update(window=name, options=options, **digit_quality(x, real), seconds=round(time.perf_counter() - t0, 1))
        rows.append(r)
        print(f"{name:>24s}: FID {r['fid']:.3f}, confident {r['confident']:.1%}, judge {r['judge']:.1%} "
              f"({r['judge_vs_real']:.2f} of real), clean {r['clean']:.1%}, rough {r['rough']:.1%} "
              f"({r['seconds']:.0f} s)", flush=True)
    return rows


def plot(errors, gains, path: Path) -> None:
    fig = Figure(figsize=(10, 4))
    a, b = fig.subplots(1, 2)
    for split, style in (("test", "o-"), ("train", "s--")):
        e = errors[split][1:]  # t = 0 has sigma ~ 0.01: kept in the table
        a.errorbar([x.sigma for x in e], [x.defect for x in e], yerr=[2 * x.defect_se for x in e], fmt=style,
                   ms=3, label=f"{split} digits")
    a.axhline(0, color="k", lw=0.8)
    a.set(xscale="log", xlabel="noise level sigma (VE)", ylabel="2 E[eps_hat.(eps_hat - eps)] per pixel",
          title="model: orthogonality defect (0 = Bayes-optimal)")
    a.legend()
    for name, g in gains.items():
        b.plot([x.sigma for x in g], [x.gain for x in g], "o-", ms=3, label=name)
    b.set(xscale="log", yscale="log", xlabel="noise level sigma (VE) of the evaluation",
          ylabel="share of an x0 error left in the sample", title="samplers: gain of an x0 error")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a pixel-space run of 1-channel digit images (ddpm train)")
    p.add_argument("--samplers", default="ddim,dpmpp_2m,dpmpp_2m_sde", help="samplers whose gains are measured")
    p.add_argument("--steps", type=int, default=20, help="their steps (default 20)")
    p.add_argument("--gain-n", type=int, default=32, help="samples of the gain measurement (default 32)")
    p.add_argument("--data-n", type=int, default=500, help="test and training digits of the model errors (500)")
    p.add_argument("--windows", default="0.1,0.5,2", help="sigma thresholds of the SDE windows (default 0.1,0.5,2)")
    p.add_argument("--n", type=int, default=300, help="samples scored per window (default 300)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", default=None, help="output folder (default RUN/bench)")
    args = p.parse_args(argv)
    run = load_run(args.run, "ema", "cpu")
    if not run.is_image or run.image_shape[0] != 1 or run.codec is not None:
        raise SystemExit(f"{args.run}: a pixel-space run of 1-channel digit images is needed")
    guidance = run_guidance(run, None, log=lambda m: None) if run.num_classes else None
    t0 = time.perf_counter()
    errors = model_errors(run, guidance, args.data_n)
    print(f"model errors at {len(LEVELS)} levels: {time.perf_counter() - t0:.0f} s", flush=True)
    gains = {}
    for s in args.samplers.split(","):
        t0 = time.perf_counter()
        gains[s] = sampler_gains(run, guidance, s, args.steps, args.gain_n)
        print(f"gains of {s}: {time.perf_counter() - t0:.0f} s", flush=True)
    extractor = classifier_extractor("cpu")
    small, _ = _digits("test", 10**9, run.shape)
    real_feats, _ = extract(extractor, batches(to_digit_size(small), 500), total=len(small), with_logits=True,
                            progress=False)
    windows = [float(w) for w in args.windows.split(",")]
    rows = window_rows(run, guidance, args.steps, args.n, windows, extractor, real_feats, small, args.seed)

    g = f", guidance {guidance:g}" if guidance is not None else ""
    lines = [f"Machine: {cpu_name()}. Run {args.run} ({'x'.join(map(str, run.image_shape))}{g}).", "",
             f"Model error per noise level ({args.data_n} test / training digits, the same eps):", "",
             "| t | sigma | eps MSE test | eps MSE train | x0 RMSE test | defect test | defect train |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for te, tr in zip(errors["test"], errors["train"]):
        lines.append(f"| {te.t} | {te.sigma:.3g} | {te.eps_mse:.4f} | {tr.eps_mse:.4f} | {te.x0_rmse:.3f} | "
                     f"{te.defect:+.4f} ± {2 * te.defect_se:.4f} | {tr.defect:+.4f} ± {2 * tr.defect_se:.4f} |")
    lines += ["", f"Gain of an x0 error (RMS 0.01) made at one evaluation, {args.steps} steps, {args.gain_n} samples "
              "(sigma of the evaluation / gain):", "",
              "| evaluation | " + " | ".join(gains) + " |", "|---:|" + "---:|" * len(gains)]
    for k in range(max(len(v) for v in gains.values())):
        cells = [f"{v[k].sigma:.3g} / {v[k].gain:.3f}" if k < len(v) else "" for v in gains.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", f"DPM-Solver++(2M) SDE, {args.steps} steps, the SDE only in a noise window ({args.n} samples "
              "each, same seeds):", "", f"| noise injected | classifier-FID | confident | {QUALITY_HEAD} |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['window']} | {r['fid']:.3f} | {r['confident']:.1%} | {quality_cells(r)} |" for r in rows]
    lines.append(f"| real test digits | | | {quality_cells(digit_quality(small, small))} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out) if args.out else run.folder("bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "noise_levels.md").write_text(table + "\n")
    (out / "noise_levels.json").write_text(json.dumps({
        "run": str(args.run), "guidance": guidance,
        "errors": {k: [e.as_dict() for e in v] for k, v in errors.items()},
        "gains": {k: [e.as_dict() for e in v] for k, v in gains.items()}, "windows": rows}, indent=1))
    plot(errors, gains, out / "noise_levels.png")
    print(f"wrote {out / 'noise_levels.md'} and noise_levels.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
