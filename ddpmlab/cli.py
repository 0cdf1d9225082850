"""The ``ddpm`` command line: argument parsing only; each subcommand calls the library."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from ddpmlab.config import load_config
from ddpmlab.data import build_dataset, data_shape
from ddpmlab.data.check import check_folder
from ddpmlab.diffusion.reverse import ddpm_sampler_variance
from ddpmlab.diffusion.schedules import SCHEDULES, NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate import METRICS, EvalSettings, bench, evaluate_run, format_results
from ddpmlab.evaluate.bench import DEFAULT_SAMPLERS
from ddpmlab.evaluate.nll import evaluate_nll, format_nll
from ddpmlab.io.checkpoint import load_model, require_run_dir
from ddpmlab.io.diffusers_bridge import export_diffusers, load_diffusers_model
from ddpmlab.io.images import comparison_row, load_mask, load_picture
from ddpmlab.samplers.editing import img2img, inpaint, strength_to_steps
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import conditioning
from ddpmlab.samplers.registry import SAMPLERS, check_timesteps_name, get_sampler, timesteps_options
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.loop import resume_config, train
from ddpmlab.viz import commands as V
from ddpmlab.viz import save_grid, save_scatter

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
    if args.resume:
        run_dir = require_run_dir(args.resume)
        if args.config:
            raise DDPMError("--config cannot be combined with --resume (the run keeps its stored config.yaml)")
        over = load_config(None, args.overrides) if args.overrides else None
        keys = [o.split("=", 1)[0].strip() for o in args.overrides]
        cfg = resume_config(run_dir, over, keys, force=args.force)
        _train_explaining_oom(train, cfg, run_dir=run_dir, resume=True, progress=not args.no_progress)
        return 0
    if args.force:
        raise DDPMError("--force only applies with --resume RUN_DIR (to change a stored config key)")
    cfg = load_config(args.config or "mnist", args.overrides)
    _train_explaining_oom(train, cfg, progress=not args.no_progress)
    return 0


def _train_explaining_oom(train, cfg, **kwargs) -> None:
    import torch

    try:
        train(cfg, **kwargs)
    except torch.OutOfMemoryError:
        raise DDPMError(
            f"out of GPU memory with train.batch_size={cfg.train.batch_size}; the last checkpoint is intact. "
            "Start a new run with a smaller train.batch_size or model (model.base_channels), or "
            "train.mixed_precision=bf16"
        ) from None


def cmd_data_check(args) -> int:
    return check_folder(args.dir, tuple(args.image_size), args.channels, limit=args.limit)


def cmd_sample(args) -> int:
    import numpy as np
    import torch


    get_sampler(args.sampler)  # fail fast on a bad name, before loading anything
    check_timesteps_name(args.sampler, args.timesteps)
    device = _auto_device(args.device)
    if (args.run_dir is None) == (args.from_diffusers is None):
        raise DDPMError("give either RUN_DIR (a ddpmlab run) or --from-diffusers FOLDER (a local diffusers model)")
    if args.from_diffusers:  # a local diffusers UNet2DModel + scheduler folder, converted to ddpmlab's UNet

        if getattr(args, "weights_file", None):
            raise DDPMError("--weights-file belongs to a ddpmlab run; --from-diffusers reads the folder's own weights")
        cfg, model = load_diffusers_model(args.from_diffusers, device)
    else:
        cfg, model = load_model(args.run_dir, args.weights, device, weights_file=args.weights_file)
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
        options["variance"] = args.variance or ddpm_sampler_variance(cfg.diffusion.variance)
    model, labels = conditioning(model, args.n, args.label, args.guidance, cfg.train.label_dropout)
    shape = data_shape(cfg)
    is_image = len(shape) == 3
    options.update(timesteps_options(args.sampler, args.timesteps, model, schedule, shape, steps,
                                     prediction=cfg.diffusion.prediction, clip_x0=1.0 if is_image else None,
                                     device=device, y=labels, seed=args.seed))
    x = generate(model, schedule, shape, args.n, sampler=args.sampler, steps=steps,
                 prediction=cfg.diffusion.prediction, clip_x0=1.0 if is_image else None,
                 batch_size=args.batch_size, seed=args.seed, device=device, labels=labels, **options)
    run_dir = Path(args.run_dir) if args.run_dir else Path(".")  # --from-diffusers: ./samples/
    out = Path(args.out) if args.out else run_dir / "samples" / f"{args.sampler}{_timesteps_tag(args)}_{steps}steps_seed{args.seed}{_cond_tag(args)}.png"
    if is_image:
        save_grid(x, out, scale=max(1, min(4, 128 // max(shape[1:]))))
    else:
        ref = build_dataset(cfg)
        save_scatter(x, out, reference=torch.stack([ref[i][0] for i in range(min(len(ref), 2000))]),
                     title=f"{args.sampler}, {steps} steps")
    print(f"wrote {out}")
    if args.npz:
        npz = out.with_suffix(".npz")
        np.savez_compressed(npz, samples=x.numpy())
        print(f"wrote {npz} (samples: {tuple(x.shape)}, values in the data's scale)")
    return 0


def _timesteps_tag(args) -> str:
    return "" if args.timesteps is None else f"_{args.timesteps}"


def _cond_tag(args) -> str:
    """File-name suffix for a class label and a guidance scale, e.g. '_class3_guidance2'."""
    tag = "" if args.label is None else f"_class{args.label}"
    return tag + ("" if args.guidance is None else f"_guidance{args.guidance:g}")


def _image_run(args, command: str):
    """(cfg, model, schedule, shape, device) of a trained image run, for inpaint and img2img."""
    if args.n < 1:
        raise DDPMError(f"--n must be at least 1, got {args.n}")
    device = _auto_device(args.device)
    cfg, model = load_model(args.run_dir, args.weights, device)
    shape = data_shape(cfg)
    if len(shape) != 3:
        raise DDPMError(f"ddpm {command} works on image models; {args.run_dir} was trained on 2-D points")
    return cfg, model, NoiseSchedule.from_config(cfg.diffusion), shape, device


def cmd_inpaint(args) -> int:
    cfg, model, schedule, shape, device = _image_run(args, "inpaint")
    T = schedule.num_timesteps
    if not 1 <= args.steps <= T:
        raise DDPMError(f"--steps must be between 1 and {T} (the model's num_timesteps), got {args.steps}")
    image = load_picture(args.image, shape, args.resize, "--image")
    mask = load_mask(args.mask, shape[1:], args.resize, "--mask")
    model, labels = conditioning(model, args.n, args.label, args.guidance, cfg.train.label_dropout)
    x = inpaint(model, schedule, image, mask, args.n, prediction=cfg.diffusion.prediction, labels=labels,
                steps=args.steps, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample,
                variance=args.variance, seed=args.seed, batch_size=args.batch_size, device=device)
    out = Path(args.out) if args.out else (Path(args.run_dir) / "samples" /
                                           f"inpaint_{Path(args.image).stem}_seed{args.seed}{_cond_tag(args)}.png")
    row = comparison_row(image, x, mask)
    save_grid(row, out, nrow=len(row), scale=max(1, min(4, 128 // max(shape[1:]))))
    print(f"wrote {out} (input, mask, {args.n} inpaintings)")
    return 0


def cmd_img2img(args) -> int:
    get_sampler(args.sampler)  # fail fast on a bad name, before loading anything
    cfg, model, schedule, shape, device = _image_run(args, "img2img")
    n0 = strength_to_steps(args.strength, schedule.num_timesteps)
    steps = args.steps if args.steps is not None else (n0 if args.sampler == "ddpm" else 50)
    if steps < 1:
        raise DDPMError(f"--steps must be at least 1, got {steps}")
    options = {"eta": args.eta} if args.sampler == "ddim" else {"variance": args.variance} if args.sampler == "ddpm" else {}
    image = load_picture(args.image, shape, args.resize, "--image")
    model, labels = conditioning(model, args.n, args.label, args.guidance, cfg.train.label_dropout)
    x = img2img(model, schedule, image, args.strength, args.n, sampler=args.sampler, steps=steps,
                prediction=cfg.diffusion.prediction, labels=labels, seed=args.seed, batch_size=args.batch_size,
                device=device, **options)
    out = Path(args.out) if args.out else (Path(args.run_dir) / "samples" / f"img2img_{Path(args.image).stem}_"
                                           f"strength{args.strength:g}_seed{args.seed}{_cond_tag(args)}.png")
    row = comparison_row(image, x)
    save_grid(row, out, nrow=len(row), scale=max(1, min(4, 128 // max(shape[1:]))))
    print(f"wrote {out} (input, {args.n} results; noised to t0 = {n0} of {schedule.num_timesteps}, "
          f"{min(steps, n0)} {args.sampler} steps back)")
    return 0


def _edit_arguments(e: argparse.ArgumentParser) -> None:
    """Options inpaint and img2img share."""
    e.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train` (an image model)")
    e.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...); converted to the model's channels")
    e.add_argument("--resize", action="store_true",
                   help="scale and center-crop the input(s) to the model's image size (default: sizes must match)")
    e.add_argument("--n", type=int, default=4, help="number of results (default 4)")
    e.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
    e.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                   help="classifier-free guidance scale (conditional models)")
    e.add_argument("--variance", default="beta", choices=["beta", "posterior"],
                   help="DDPM sigma_t^2: beta_t or the posterior beta_tilde_t")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")


def cmd_eval(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS and m not in METRICS]
    if unknown:
        raise DDPMError(f"unknown metric(s) {', '.join(unknown)} in --metrics; choose from "
                        f"{', '.join(EVAL_METRICS + tuple(METRICS))}")
    if "nll" in metrics:
        result, js, png = evaluate_nll(args.run_dir, n=args.n, decoder=args.decoder, bin_width=args.bin_width,
                                       t_stride=args.t_stride, batch_size=args.batch_size, seed=args.seed,
                                       weights=args.weights, device=_auto_device(args.device),
                                       progress=not args.no_progress)
        print(format_nll(result))
        print(f"wrote {js} and {png}")
    quality = [m for m in metrics if m not in EVAL_METRICS]
    if quality or not metrics:  # no --metrics: the sample-quality defaults of the data kind
        _eval_sample_quality(args, quality)
    return 0


def _eval_sample_quality(args, metrics) -> None:
    """FID/KID/IS/precision-recall (images) or SWD/MMD (2-D) of samples, beside n data points."""
    options = {"eta": args.eta} if args.sampler == "ddim" else {}
    if args.sampler == "ddpm" and args.variance:
        options["variance"] = args.variance
    extractor = args.extractor or ("inception" if args.inception_weights else "classifier")
    s = EvalSettings(metrics=metrics, n=args.n or 1000, sampler=args.sampler, steps=args.steps,
                     sampler_options=options, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                     extractor=extractor, inception_weights=args.inception_weights, weights=args.weights,
                     baseline=not args.no_baseline)
    results, path = evaluate_run(args.run_dir, s, _auto_device(args.device), cache_dir=args.cache_dir,
                                 use_cache=not args.no_cache, progress=not args.no_progress, out=args.out)
    st, run = results["settings"], results["run"]
    what = f", {results['extractor']['name']} features" if "extractor" in results else ""
    print(f"{args.run_dir} ({run['checkpoint']}, {run['weights']}): {st['n']} samples, {st['sampler']} "
          f"{st['steps']} steps, seed {st['seed']}{what}")
    print(format_results(results))
    print(f"wrote {path}")


EVAL_METRICS = ("nll",)  # metrics with their own code path; the others come from ddpmlab.evaluate.METRICS
EVAL_HELP = """Evaluate a trained run (its newest checkpoint, EMA weights by default).

Sample quality (the default): draw --n samples, extract features once with the extractor in
eval mode, and compare them with reference statistics of the run's whole dataset (cached in
~/.cache/ddpmlab, keyed by the data's content and the extractor):
  fid   Frechet distance of features      kid  kernel distance (unbiased MMD^2)
  is    Inception Score                   pr   precision and recall (k=3 nearest neighbours)
  acc   classifier accuracy of class-conditional samples
  swd, mmd  sliced Wasserstein distance and MMD to fresh data (2-D runs)
The same metrics of --n data points are printed beside: what a perfect model would reach
with this many samples. Extractors: 'classifier' (shipped MNIST classifier, 1x28x28 digits,
offline) or 'inception' (the FID Inception-v3; needs --inception-weights PATH to
pt_inception-2015-12-05-6726825d.pth, never downloaded). Results: RUN_DIR/eval/*.json with
everything needed to reproduce them.

nll: the variational bound (Ho et al. 2020, Eq. 5) on held-out data in bits/dim, with its
terms (prior L_T, decoder L_0, sum of KL terms), written to RUN_DIR/eval/nll.json and
nll_vs_t.png.

Examples:
  ddpm eval runs/mnist-...                        classifier FID/KID/IS/PR of 1000 DDIM-50 samples
  ddpm eval runs/mnist-... --metrics fid --n 5000 --sampler ddpm --steps 250
  ddpm eval runs/cifar-... --extractor inception --inception-weights ~/pt_inception-2015-12-05-6726825d.pth
  ddpm eval runs/toy2d-...                        sliced Wasserstein and MMD
"""


def _eval_quality_arguments(ev: argparse.ArgumentParser) -> None:
    """Options of the sample-quality metrics of ``ddpm eval``."""
    ev.add_argument("--sampler", default="ddim", help=f"one of: {', '.join(SAMPLERS)} (default ddim)")
    ev.add_argument("--steps", type=int, default=None, help="sampling steps (default: T for ddpm, 50 otherwise)")
    ev.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    ev.add_argument("--variance", default=None, choices=["beta", "posterior"],
                    help="DDPM sigma_t^2 (default: the run's own)")
    ev.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                    help="classifier-free guidance scale (conditional runs; samples cycle through the classes)")
    ev.add_argument("--extractor", default=None, choices=["classifier", "inception"],
                    help="feature network (default: classifier, or inception when --inception-weights is given)")
    ev.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="local FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth or .safetensors)")
    ev.add_argument("--cache-dir", default=None,
                    help="reference-statistics cache (default $DDPMLAB_CACHE or ~/.cache/ddpmlab)")
    ev.add_argument("--no-cache", action="store_true", help="recompute the reference statistics, store nothing")
    ev.add_argument("--no-baseline", action="store_true", help="skip the same metrics of --n data points")
    ev.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval/step..._<sampler>..._n<n>.json)")


VIZ_HELP = """Pictures of diffusion. Each command writes PNG/GIF files and prints their paths;
files of a run go to RUN_DIR/viz/ (others to ./viz/) unless --out is given.

  forward   [RUN_DIR] [--config C]  images (or 2-D data) noised by q(x_t | x_0) at several t
  reverse   RUN_DIR                 GIF of x_t and the predicted x0 along sampling + a strip of stills
  schedules                         beta_t, alpha_bar_t and log-SNR of the schedules side by side
  toy       [RUN_DIR]               2-D data, forward diffusion, reverse process: stills and a GIF
  loss      RUN_DIR [RUN_DIR ...]   training loss curves (and train.eval_every metrics) from the logs
  grid      RUN_DIR | --npz FILE    a grid of fresh samples, or of samples saved by `ddpm sample --npz`

Examples:
  ddpm viz forward --config mnist --n 4
  ddpm viz reverse runs/mnist-... --sampler ddim --steps 50 --n 16
  ddpm viz schedules --T 1000
  ddpm viz toy runs/toy-...
  ddpm viz loss runs/mnist-a runs/mnist-b
Sample metrics over training live in TensorBoard too: tensorboard --logdir runs
"""


def cmd_viz(args) -> int:
    device = _auto_device(getattr(args, "device", "cpu"))
    sampling = {k: getattr(args, k) for k in ("eta", "variance") if getattr(args, k, None) is not None}
    kind = args.viz_command
    if kind == "forward":
        ts = [int(t) for t in args.t.split(",")] if args.t else None
        files = V.viz_forward(args.run_dir, args.config, args.n, ts, args.seed, args.out)
    elif kind == "reverse":
        files = V.viz_reverse(args.run_dir, args.sampler, args.steps, args.n, args.seed, args.frames, args.weights,
                              device, args.out, **sampling)
    elif kind == "schedules":
        names = [s.strip() for s in args.schedules.split(",") if s.strip()]
        files = V.viz_schedules(names, args.T, args.beta_start, args.beta_end, args.out)
    elif kind == "toy":
        files = V.viz_toy(args.run_dir, args.config, args.sampler, args.steps, args.n, args.seed, args.frames,
                          args.weights, device, args.out, **sampling)
    elif kind == "loss":
        files = V.viz_loss(args.run_dirs, args.smooth, args.out)
    else:
        files = V.viz_grid(args.run_dir, args.npz, args.sampler, args.steps, args.n, args.seed, args.weights,
                           device, args.out, **sampling)
    for f in files:
        print(f"wrote {f}")
    return 0


def _add_viz_parser(sub) -> None:
    v = sub.add_parser("viz", help="pictures: forward/reverse process, schedules, 2-D toy, loss, grids",
                       description=VIZ_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    vs = v.add_subparsers(dest="viz_command", metavar="KIND", required=True)

    def sampling(p, sampler="ddim", n=16):
        p.add_argument("--sampler", default=sampler, help=f"one of: {', '.join(SAMPLERS)} (default {sampler})")
        p.add_argument("--steps", type=int, default=None, help="sampling steps (default: T for ddpm, 50 otherwise)")
        p.add_argument("--eta", type=float, default=None, help="DDIM noise (default 0)")
        p.add_argument("--variance", default=None, choices=["beta", "posterior"],
                       help="DDPM sigma_t^2 (default: the run's own)")
        p.add_argument("--n", type=int, default=n, help=f"number of samples (default {n})")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
        p.add_argument("--out", help="output folder (default RUN_DIR/viz)")

    f = vs.add_parser("forward", help="images noised by the forward process at several t",
                      description="Rows: --n training images; columns: x_t ~ q(x_t | x_0) at the timesteps --t, "
                                  "one noise draw shared by all t (Ho et al. 2020, Eq. 4). 2-D data: the whole "
                                  "set at each t. Uses the run's data and schedule, or those of --config.")
    f.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run (default: the data of --config)")
    f.add_argument("--config", default=None, help="bundled config name or YAML file when no RUN_DIR (default mnist)")
    f.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    f.add_argument("--t", default=None, help="comma-separated timesteps (default 0,50,100,200,300,500,700,T-1)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="output folder (default RUN_DIR/viz or ./viz)")

    r = vs.add_parser("reverse", help="GIF and stills of x_t and the predicted x0 along sampling",
                      description="Sample --n images and record --frames snapshots of x_t (left) and of the "
                                  "model's prediction of x_0 (right): reverse_<sampler><steps>.gif and .png.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="an image run written by `ddpm train`")
    sampling(r)
    r.add_argument("--frames", type=int, default=25, help="snapshots along sampling (default 25)")

    sc = vs.add_parser("schedules", help="beta_t, alpha_bar_t and log-SNR of the noise schedules",
                       description="Three panels side by side: beta_t (log scale), alpha_bar_t and "
                                   "log-SNR = log(alpha_bar / (1 - alpha_bar)) against t, one line per schedule.")
    sc.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated (default {','.join(SCHEDULES)})")
    sc.add_argument("--T", type=int, default=1000, help="number of timesteps (default 1000)")
    sc.add_argument("--beta-start", type=float, default=1e-4)
    sc.add_argument("--beta-end", type=float, default=0.02)
    sc.add_argument("--out", help="output PNG or folder (default ./viz/schedules.png)")

    ty = vs.add_parser("toy", help="2-D data, forward diffusion and reverse process (stills and GIF)",
                       description="toy_data.png, toy_forward.png; with a RUN_DIR also toy_reverse.png (samples "
                                   "along the reverse process over the data in grey) and toy_diffusion.gif "
                                   "(forward, then reverse).")
    ty.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a 2-D toy run (default: data and forward only)")
    ty.add_argument("--config", default=None, help="config when no RUN_DIR (default toy2d)")
    sampling(ty, sampler="ddpm", n=2000)
    ty.add_argument("--frames", type=int, default=25, help="reverse-process snapshots (default 25)")

    lo = vs.add_parser("loss", help="training loss curves (and eval metrics) of one or more runs",
                       description="Loss from RUN_DIR/log.csv (raw, and smoothed by an exponential moving "
                                   "average), and the metrics of RUN_DIR/eval.csv (train.eval_every) beside it.")
    lo.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="runs written by `ddpm train`")
    lo.add_argument("--smooth", type=float, default=0.8, help="EMA weight of the smoothed curve (default 0.8)")
    lo.add_argument("--out", help="output PNG or folder (default RUN_DIR/viz/loss.png of the first run)")

    g = vs.add_parser("grid", help="a grid of samples (fresh, or from `ddpm sample --npz`)",
                      description="Sample a run and write a grid (images) or scatter plot (2-D), or draw the "
                                  "samples of an .npz file written by `ddpm sample --npz`.")
    g.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run written by `ddpm train`")
    g.add_argument("--npz", default=None, help="samples saved by `ddpm sample --npz` instead of sampling")
    sampling(g, n=64)
    v.set_defaults(func=cmd_viz)


def cmd_export(args) -> int:
    require_run_dir(args.run_dir)
    out = export_diffusers(args.run_dir, args.out, which=args.weights)
    print(f"wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    return 0


def build_parser() -> argparse.ArgumentParser:
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
    t.add_argument("--force", action="store_true",
                   help="with --resume: allow changing stored config keys (e.g. train.lr after a divergence)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run and write a PNG grid (images) or a scatter plot (2D data).")
    s.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a folder written by `ddpm train`")
    s.add_argument("--from-diffusers", metavar="FOLDER",
                   help="sample a local diffusers UNet2DModel + scheduler folder instead of a run (e.g. a downloaded "
                        "google/ddpm-cifar10-32; nothing is downloaded); output goes to ./samples/")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    s.add_argument("--sampler", default="ddim", help=f"one of: {', '.join(SAMPLERS)} (default ddim)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps (default: T for ddpm, 50 otherwise)")
    s.add_argument("--timesteps", default=None, metavar="NAME",
                   help="step schedule: uniform, leading, trailing (all samplers), linspace, karras, logsnr, "
                        "optimized (solvers; optimized is fitted to this model on calibration noise first); "
                        "default: the sampler's own (ddim: uniform, dpmpp/unipc: logsnr, euler/heun: karras)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    s.add_argument("--variance", default=None, choices=["beta", "posterior", "learned"],
                   help="DDPM sigma_t^2: beta_t, the posterior beta_tilde_t or the model's learned variance "
                        "(default: the run's diffusion.variance)")
    s.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
    s.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                   help="classifier-free guidance scale (conditional models): 1 conditional, 0 unconditional, "
                        ">1 stronger; without --class the samples cycle through all classes")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    s.add_argument("--weights-file", metavar="FILE",
                   help="use these weights with RUN_DIR's config: .safetensors, or a PyTorch state dict "
                        "(loaded with weights_only=True: pickles that would run code are refused)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    s.add_argument("--out", help="output PNG (default RUN_DIR/samples/<sampler>_<steps>steps_seed<seed>.png)")
    s.add_argument("--npz", action="store_true", help="also save the raw samples as .npz beside the PNG")
    s.set_defaults(func=cmd_sample)

    ip = sub.add_parser("inpaint", help="fill a masked region of an image (RePaint)",
                        description="Fill the white region of --mask in --image with a trained model (RePaint, "
                                    "Lugmayr et al. 2022): the black region is kept exactly. Writes one row: "
                                    "input, mask, then the --n results.\nThe mask is a PNG of the same size as "
                                    "the image: white (> 50% grey) = fill, black = keep.",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    _edit_arguments(ip)
    ip.add_argument("--mask", required=True, help="PNG mask, same size as the image: white = fill, black = keep")
    ip.add_argument("--steps", type=int, default=250, help="respaced diffusion steps (default 250, as the paper)")
    ip.add_argument("--jump-length", type=int, default=10,
                    help="resampling: go back this many steps at each jump point (default 10)")
    ip.add_argument("--jump-n-sample", type=int, default=10,
                    help="resampling: denoise each stretch this many times (default 10; 1 = no resampling)")
    ip.add_argument("--out", help="output PNG (default RUN_DIR/samples/inpaint_<image>_seed<seed>.png)")
    ip.set_defaults(func=cmd_inpaint)

    ii = sub.add_parser("img2img", help="redraw an image from a noised copy (SDEdit)",
                        description="SDEdit (Meng et al. 2022): noise --image to t0 = strength * T, then denoise "
                                    "it back with any sampler. strength 0 returns the input, 1 ignores it. "
                                    "Writes one row: input, then the --n results.")
    _edit_arguments(ii)
    ii.add_argument("--strength", type=float, default=0.5, help="how far to noise, in [0, 1] (default 0.5)")
    ii.add_argument("--sampler", default="ddim", help=f"one of: {', '.join(SAMPLERS)} (default ddim)")
    ii.add_argument("--steps", type=int, default=None,
                    help="sampler steps from t0 down to 0 (default: all t0 for ddpm, 50 otherwise; at most t0)")
    ii.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like")
    ii.add_argument("--out", help="output PNG (default RUN_DIR/samples/img2img_<image>_strength<s>_seed<seed>.png)")
    ii.set_defaults(func=cmd_img2img)

    ev = sub.add_parser("eval", help="evaluate a trained run (FID/KID/IS/precision-recall, SWD/MMD, NLL)",
                        description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ev.add_argument("--metrics", default="",
                    help="comma-separated list of fid, kid, is, pr, acc (images), swd, mmd (2-D), nll "
                         "(default: fid,kid,is,pr for images, swd,mmd for 2-D; acc too for conditional runs)")
    ev.add_argument("--n", type=int, default=None,
                    help="samples to draw for the quality metrics (default 1000); for nll the number of held-out "
                         "examples (default: the whole test split; 5000 fresh 2-D points)")
    _eval_quality_arguments(ev)
    ev.add_argument("--decoder", default="discretized", choices=["discretized", "continuous"],
                    help="p(x_0|x_1): discretized Gaussian (Eq. 13; 8-bit data, or give --bin-width) or the "
                         "continuous density (a differential NLL, for 2-D points)")
    ev.add_argument("--bin-width", type=float, default=None,
                    help="bin width of non-8-bit data on the model's scale, e.g. 0.125 for the 17-level digits")
    ev.add_argument("--t-stride", type=int, default=1,
                    help="evaluate one random t in every block of this many (an unbiased estimate; default 1: all T)")
    ev.add_argument("--batch-size", type=int, default=250)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    ev.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.set_defaults(func=cmd_eval)

    ex = sub.add_parser("export", help="write a run in another library's format (diffusers)",
                        description="Export a trained run. --format diffusers writes a folder that "
                                    "diffusers.DDPMPipeline.from_pretrained(OUT) loads (UNet2DModel + DDPMScheduler, "
                                    "safetensors); options UNet2DModel cannot express are refused by name.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ex.add_argument("out", metavar="OUT", help="new output folder")
    ex.add_argument("--format", default="diffusers", choices=["diffusers"], help="output format (default diffusers)")
    ex.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    ex.set_defaults(func=cmd_export)

    da = sub.add_parser("data", help="inspect a dataset without training (ddpm data check DIR)")
    dsub = da.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    dc = dsub.add_parser("check", help="scan an image folder and list the files training would skip",
                         description="Decode every image below DIR as training would (EXIF rotation, conversion "
                                     "to --channels, resize to --image-size) and report: usable images per class, "
                                     "images upscaled because they are smaller than the target, and every file "
                                     "that would be skipped with its reason. Exit status 0 when at least one image "
                                     "is usable, 1 otherwise.")
    dc.add_argument("dir", metavar="DIR", help="folder of images (sub-folders = classes), as data.path")
    dc.add_argument("--image-size", type=int, nargs=2, default=[32, 32], metavar=("H", "W"),
                    help="target size, as data.image_size (default 32 32)")
    dc.add_argument("--channels", type=int, default=3, choices=[1, 3, 4], help="as data.channels (default 3)")
    dc.add_argument("--limit", type=int, default=0, help="list at most this many skipped files (default 0: all)")
    dc.set_defaults(func=cmd_data_check)
    _add_viz_parser(sub)
    _add_bench_parser(sub)
    return p


def cmd_bench(args) -> int:
    specs = [bench.SamplerSpec.parse(s) for s in args.samplers.split(",") if s.strip()]
    nfes = bench.parse_nfes(args.nfe)
    if (args.run_dir is None) == (args.analytic is None):
        raise DDPMError("give either RUN_DIR (a trained run) or --analytic mixture2d|mixture64d")
    if args.n is not None and args.n < 2:
        raise DDPMError(f"--n must be at least 2, got {args.n}")
    if args.analytic:
        res = bench.bench_analytic(args.analytic, specs, nfes, n=args.n or 20000, seed=args.seed)
        out = Path(args.out or f"runs/bench-{args.analytic}")
    else:
        res = bench.bench_run(args.run_dir, specs, nfes, n=args.n or 256, seed=args.seed,
                              reference_steps=args.reference_steps, batch_size=args.batch_size,
                              device=_auto_device(args.device), weights=args.weights)
        out = Path(args.out or Path(args.run_dir) / "bench")
    print(bench.markdown_table(res))
    for path in bench.save(res, out):
        print(f"wrote {path}")
    return 0


def _add_bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: sampler error vs NFE (ddpm bench samplers ...)")
    bsub = b.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    bs = bsub.add_parser(
        "samplers", help="error of each sampler per NFE against a reference",
        description="For each sampler and NFE: the sliced Wasserstein-2 distance of its samples to a reference, "
                    "as a multiple of the two-sample floor (the distance between two independent reference sets; "
                    "1.0 = as close as sampling noise allows).\nRUN_DIR: reference = an ancestral (ddpm) run with "
                    "--reference-steps steps from the same noise seeds.\n--analytic: the exact noise predictor of a "
                    "Gaussian mixture, reference = exact samples.\nWrites sampler_bench.md/.png/.json to --out "
                    "(default RUN_DIR/bench or runs/bench-<target>).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bs.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a folder written by `ddpm train`")
    bs.add_argument("--analytic", choices=["mixture2d", "mixture64d"], help="built-in target, no checkpoint needed")
    bs.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS),
                    help="comma-separated NAME or NAME:TIMESTEPS, e.g. dpmpp_2m:karras,unipc:optimized "
                         f"(default {','.join(DEFAULT_SAMPLERS)})")
    bs.add_argument("--nfe", default="5,10,20,50", help="model evaluations to test (default 5,10,20,50)")
    bs.add_argument("--n", type=int, default=None, help="samples per set (default 256 for a run, 20000 analytic)")
    bs.add_argument("--reference-steps", type=int, default=1000, help="ancestral steps of the reference (default 1000)")
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--batch-size", type=int, default=256)
    bs.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    bs.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    bs.add_argument("--out", help="output folder")
    bs.set_defaults(func=cmd_bench)


def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """ddpmlab's own warnings (skipped images, damaged checkpoints) as plain 'warning: ...' lines."""
    if f"{Path(__file__).parent}" in str(filename):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


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
    warnings.formatwarning = _format_warning
    if args.command != "train":  # train decides by train.keep_freed_memory and the device
        keep_freed_memory()  # CPU sampling and evaluation: ~20 % faster network calls (ddpmlab.training.allocator)
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
