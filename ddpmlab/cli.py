"""The ``ddpm`` command line: argument parsing only; each subcommand calls the library."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import DDPMError

EPILOG = "Examples:\n  ddpm train\n  ddpm train --config toy2d\n  ddpm sample runs/mnist-... --sampler ddim --steps 50"


def _auto_device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cmd_train(args) -> int:
    from .config import load_config
    from .train import resume_config, train

    if args.resume:
        from .checkpoint import require_run_dir

        run_dir = require_run_dir(args.resume)
        if args.config:
            raise DDPMError("--config cannot be combined with --resume (the run keeps its stored config.yaml)")
        over = load_config(None, args.overrides) if args.overrides else None
        keys = [o.split("=", 1)[0].strip() for o in args.overrides]
        cfg = resume_config(run_dir, over, keys)
        train(cfg, run_dir=run_dir, resume=True, progress=not args.no_progress)
        return 0
    cfg = load_config(args.config or "mnist", args.overrides)
    train(cfg, progress=not args.no_progress)
    return 0


def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from .checkpoint import load_model
    from .data import data_shape
    from .samplers import get_sampler
    from .samplers.generate import generate
    from .schedules import NoiseSchedule
    from .viz import save_grid, save_scatter

    get_sampler(args.sampler)  # fail fast on a bad name, before loading anything
    device = _auto_device(args.device)
    cfg, model = load_model(args.run_dir, args.weights, device)
    schedule = NoiseSchedule.from_config(cfg.diffusion)
    T = schedule.num_timesteps
    steps = args.steps if args.steps is not None else (T if args.sampler == "ddpm" else 50)
    if not 1 <= steps <= T:
        raise DDPMError(f"--steps must be between 1 and {T} (the model's num_timesteps), got {steps}")
    if args.n < 1:
        raise DDPMError(f"--n must be at least 1, got {args.n}")
    options = {}
    if args.sampler == "ddim":
        options["eta"] = args.eta
    if args.sampler == "ddpm":
        options["variance"] = args.variance
    labels = None
    if args.label is not None:
        if not cfg.model.num_classes:
            raise DDPMError("--class needs a class-conditional model (model.num_classes); this run is unconditional")
        labels = torch.full((args.n,), args.label, dtype=torch.long)
    shape = data_shape(cfg)
    is_image = len(shape) == 3
    x = generate(model, schedule, shape, args.n, sampler=args.sampler, steps=steps,
                 prediction=cfg.diffusion.prediction, clip_x0=1.0 if is_image else None,
                 batch_size=args.batch_size, seed=args.seed, device=device, labels=labels, **options)
    run_dir = Path(args.run_dir)
    out = Path(args.out) if args.out else run_dir / "samples" / f"{args.sampler}_{steps}steps_seed{args.seed}.png"
    if is_image:
        save_grid(x, out, scale=max(1, min(4, 128 // max(shape[1:]))))
    else:
        from .data import build_dataset

        ref = build_dataset(cfg)
        save_scatter(x, out, reference=torch.stack([ref[i][0] for i in range(min(len(ref), 2000))]),
                     title=f"{args.sampler}, {steps} steps")
    print(f"wrote {out}")
    if args.npz:
        npz = out.with_suffix(".npz")
        np.savez_compressed(npz, samples=x.numpy())
        print(f"wrote {npz} (samples: {tuple(x.shape)}, values in the data's scale)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .samplers import SAMPLERS

    p = argparse.ArgumentParser(
        prog="ddpm", description="ddpmlab: train, sample and study denoising diffusion probabilistic models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (default: the quick MNIST config)",
                       description="Train a DDPM. With no arguments: the bundled MNIST digits, ~10 min on 2 CPU cores.\n"
                                   "Override any config key as key=value, e.g. train.steps=2000 model.base_channels=64.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML file or bundled config name (mnist, toy2d, cifar10); default: mnist")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run and write a PNG grid (images) or a scatter plot (2D data).")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--sampler", default="ddim", help=f"one of: {', '.join(SAMPLERS)} (default ddim)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: T for ddpm, 50 otherwise)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    s.add_argument("--variance", default="beta", choices=["beta", "posterior"],
                   help="DDPM sigma_t^2: beta_t or the posterior beta_tilde_t")
    s.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    s.add_argument("--out", help="output PNG (default RUN_DIR/samples/<sampler>_<steps>steps_seed<seed>.png)")
    s.add_argument("--npz", action="store_true", help="also save the raw samples as .npz beside the PNG")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options: collect the ones argparse left
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except DDPMError as e:
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
