"""Does classifier-free guidance move MNIST samples towards the requested digit?

    python benchmarks/guidance_mnist.py                      # trains a class-conditional MNIST run first
    python benchmarks/guidance_mnist.py --run runs/mnist-cond --n 500 --scales 0 1 2 3 5

Samples ``--n`` digits (cycling through 0..9) from a class-conditional MNIST run at each
guidance scale and asks the shipped MNIST classifier (ddpmlab/classifier.py) whether each
sample is the requested digit.  Scale 0 is unconditional sampling (the hit rate is chance,
~10 %), 1 plain conditional sampling, > 1 guided (Ho & Salimans 2022).  Without ``--run``
it first trains the quick MNIST config with model.num_classes=10 (label dropout 0.1),
``--train-steps`` steps, into runs/guidance-mnist-<steps>.

Prints, per scale: accuracy on the requested digit, the classifier's mean confidence in
it, and the pixel std of the samples (guidance that is too strong saturates them), and
writes a grid with one row per scale (columns: digits 0..9) beside the run's samples.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def train_run(steps: int, out_dir: str) -> Path:
    from ddpmlab.config import load_config
    from ddpmlab.io.checkpoint import is_run_dir, load_run_config
    from ddpmlab.training.tasks.diffusion import train

    run = Path(out_dir) / f"guidance-mnist-{steps}"
    if is_run_dir(run):  # finish (or just reuse) an earlier run
        return train(load_run_config(run), run_dir=run, resume=True, progress=True)
    cfg = load_config("mnist", ["model.num_classes=10", "train.label_dropout=0.1", f"train.steps={steps}",
                                f"train.out_dir={out_dir}", f"train.name={run.name}", "train.sample_every=0"])
    return train(cfg, progress=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="a class-conditional MNIST run (default: train one)")
    p.add_argument("--train-steps", type=int, default=1400)
    p.add_argument("--out-dir", default="runs")
    p.add_argument("--n", type=int, default=200, help="samples per scale (cycling through the digits)")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from ddpmlab.diffusion.schedules import NoiseSchedule
    from ddpmlab.evaluate.classifier import load_mnist_classifier
    from ddpmlab.io.checkpoint import load_model
    from ddpmlab.samplers.generate import generate
    from ddpmlab.samplers.guidance import guided
    from ddpmlab.viz import save_grid

    device = "cuda" if torch.cuda.is_available() else "cpu"
    run = Path(args.run) if args.run else train_run(args.train_steps, args.out_dir)
    cfg, model = load_model(run, "ema", device)
    if cfg.data.dataset != "mnist" or not cfg.model.num_classes:
        raise SystemExit(f"{run} is not a class-conditional MNIST run (data.dataset=mnist, model.num_classes=10)")
    clf = load_mnist_classifier(device)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    labels = torch.arange(args.n) % 10
    rows, table = [], []
    for scale in args.scales:
        t0 = time.time()
        x = generate(guided(model, scale=scale), schedule, (1, 28, 28), args.n, sampler=args.sampler,
                     steps=args.steps, labels=labels, seed=args.seed, device=device, progress=False)
        with torch.no_grad():
            prob = torch.softmax(clf(x.to(device)).float(), 1).cpu()
        acc = (prob.argmax(1) == labels).float().mean().item()
        conf = prob[torch.arange(args.n), labels].mean().item()
        table.append((scale, acc, conf, x.std().item(), time.time() - t0))
        rows.append(x[:10])
    print(f"run {run} ({args.sampler}, {args.steps} steps, n={args.n} per scale, seed {args.seed})")
    print("| guidance scale | accuracy on the requested digit | mean P(requested) | pixel std | seconds |")
    print("|---:|---:|---:|---:|---:|")
    for scale, acc, conf, std, sec in table:
        print(f"| {scale:g} | {acc:.3f} | {conf:.3f} | {std:.3f} | {sec:.0f} |")
    out = run / "samples" / f"guidance_scales_{'_'.join(f'{s:g}' for s in args.scales)}.png"
    save_grid(torch.cat(rows), out, nrow=10, scale=2)
    print(f"grid (rows: scales {', '.join(f'{s:g}' for s in args.scales)}; columns: digits 0-9) -> {out}")


if __name__ == "__main__":
    main()
