"""Does classifier-free guidance move MNIST samples towards the requested digit, and are they clean digits?

    python benchmarks/guidance_mnist.py                      # trains a class-conditional MNIST run first
    python benchmarks/guidance_mnist.py --run runs/mnist-cond --n 500 --scales 0 1 2 3 5

Samples ``--n`` digits (cycling through 0..9) from a class-conditional MNIST run at each
guidance scale (through the run layer, so any run's process and prediction: DDPM or flow
matching) and asks the shipped MNIST classifier (ddpmlab/evaluate/classifier.py) whether each
sample is the requested digit.  Scale 0 is unconditional sampling (the hit rate is chance,
~10 %), 1 plain conditional sampling, > 1 guided (Ho & Salimans 2022).  Without ``--run``
it first trains the default MNIST config with model.num_classes=10 (label dropout 0.1),
``--train-steps`` steps, into runs/guidance-mnist-<steps>.

Prints, per scale: accuracy on the requested digit, the classifier's mean confidence in
it, the pixel std of the samples (guidance that is too strong saturates them), and, as
`ddpm eval --metrics judge,clean,rough` reports them (ddpmlab.evaluate.judges.digit_quality,
against the 500 held-out test digits): the honest confident share of the digit judge (which
has a reject class: the classifier above is confident on noise too) and its ratio to the real
test digits' share, the clean-background share and the rough share; the real test digits' row
beside.  Writes a grid with one row per scale (columns: digits 0..9) beside the run's samples.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_per_minute import QUALITY_HEAD, quality_cells

from ddpmlab.config import load_config
from ddpmlab.data import load_mnist
from ddpmlab.evaluate.classifier import load_mnist_classifier
from ddpmlab.evaluate.judges import digit_quality
from ddpmlab.io.checkpoint import is_run_dir, load_run_config
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.viz import save_grid


def train_run(steps: int, out_dir: str) -> Path:
    run = Path(out_dir) / f"guidance-mnist-{steps}"
    if is_run_dir(run):  # finish (or just reuse) an earlier run
        return train(load_run_config(run), run_dir=run, resume=True, progress=True)
    cfg = load_config("mnist", ["model.num_classes=10", "train.label_dropout=0.1", f"train.steps={steps}",
                                f"train.out_dir={out_dir}", f"train.name={run.name}", "train.sample_every=0"])
    return train(cfg, progress=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a class-conditional MNIST run (default: train one)")
    p.add_argument("--train-steps", type=int, default=1400)
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--n", type=int, default=200, help="samples per scale (cycling through the digits)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    run_dir = Path(args.run) if args.run else train_run(args.train_steps, args.out_dir)
    run = load_run(run_dir, "ema", device)
    if run.cfg.data.dataset != "mnist" or not run.num_classes:
        raise SystemExit(f"{run_dir} is not a class-conditional MNIST run (data.dataset=mnist, model.num_classes=10)")
    clf = load_mnist_classifier(device)
    real = load_mnist("test")[0]
    rows, table = [], []
    for scale in args.scales:
        t0 = time.time()
        plan = plan_request(run, SamplingRequest(args.sampler, args.steps, guidance=scale, seed=args.seed, n=args.n),
                            log=lambda m: None)  # the classes in turn: 0, 1, ..., 9, 0, ...
        x = draw_samples(run, plan, args.n, seed=args.seed, progress=False)
        labels = plan.labels.cpu()
        with torch.no_grad():
            prob = torch.softmax(clf(x.to(device)).float(), 1).cpu()
        acc = (prob.argmax(1) == labels).float().mean().item()
        conf = prob[torch.arange(args.n), labels].mean().item()
        table.append((scale, acc, conf, x.std().item(), digit_quality(x, real), time.time() - t0))
        rows.append(x[:10])
    print(f"run {run_dir} ({args.sampler}, {args.steps} steps, n={args.n} per scale, seed {args.seed}; judge, clean "
          f"and rough against the {len(real)} held-out test digits)")
    print(f"| guidance scale | accuracy on the requested digit | mean P(requested) | pixel std | {QUALITY_HEAD} "
          "| seconds |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for scale, acc, conf, std, quality, sec in table:
        print(f"| {scale:g} | {acc:.3f} | {conf:.3f} | {std:.3f} | {quality_cells(quality)} | {sec:.0f} |")
    print(f"| real test digits | | | | {quality_cells(digit_quality(real, real))} | |")
    out = run_dir / "samples" / f"guidance_scales_{'_'.join(f'{s:g}' for s in args.scales)}.png"
    save_grid(torch.cat(rows), out, nrow=10, scale=2)
    print(f"grid (rows: scales {', '.join(f'{s:g}' for s in args.scales)}; columns: digits 0-9) -> {out}")


if __name__ == "__main__":
    main()
