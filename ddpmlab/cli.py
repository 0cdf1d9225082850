"""The ``ddpm`` command line: parsing arguments and printing results.

Every rule about runs and sampling (device, loading, default steps, the run's variance, which
options a sampler takes, output paths) lives in :mod:`ddpmlab.runs`; each command here reads
its arguments, calls the library and says what it wrote.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import warnings
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from ddpmlab.config import Config, describe_config, format_config, load_config
from ddpmlab.data.check import check_folder
from ddpmlab.diffusion.reverse import VARIANCE_ALIASES, VARIANCES, variance_name
from ddpmlab.diffusion.schedules import SCHEDULES
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate import METRICS, EvalSettings, bench, evaluate_run, format_results
from ddpmlab.evaluate.nll import evaluate_nll, format_nll
from ddpmlab.io.checkpoint import require_run_dir
from ddpmlab.io.diffusers_bridge import export_diffusers
from ddpmlab.io.images import comparison_row, load_mask, load_picture, save_grid, save_images
from ddpmlab.runs import (
    Run,
    SamplingPlan,
    condition_tag,
    draw_samples,
    grid_scale,
    load_diffusers_run,
    load_run,
    plan_sampling,
    resolve_device,
    resolve_output,
    write_raw,
)
from ddpmlab.samplers.editing import img2img, inpaint, strength_to_steps
from ddpmlab.samplers.guidance import conditioning
from ddpmlab.samplers.registry import SAMPLER_SPECS, STEP_SCHEDULES, get_spec
from ddpmlab.training.allocator import keep_freed_memory
from ddpmlab.training.loop import resume_config, train
from ddpmlab.viz import commands as viz
from ddpmlab.viz.samples import save_samples

EPILOG = "Examples:\n  ddpm train\n  ddpm train --config toy2d\n  ddpm sample runs/mnist-... --sampler ddim --steps 50"
# how a user sets each option on the command line, for the library's messages
NAMES = {"sampler": "--sampler", "steps": "--steps", "timesteps": "--timesteps", "eta": "--eta",
         "variance": "--variance", "class": "--class", "guidance": "--guidance", "weights": "--weights",
         "n": "--n", "metrics": "--metrics", "extractor": "--extractor",
         "inception_weights": "--inception-weights PATH", "reference_steps": "--reference-steps"}
EVAL_METRICS = ("nll",)  # metrics with their own code path; the others come from ddpmlab.evaluate.METRICS


# ------------------------------------------------------------------------------ train

def cmd_train(args) -> int:
    if args.resume:
        run_dir = require_run_dir(args.resume)
        if args.config:
            raise DDPMError("--config cannot be combined with --resume (the run keeps its stored config.yaml)")
        over = load_config(None, args.overrides) if args.overrides else None
        keys = [o.split("=", 1)[0].strip() for o in args.overrides]
        cfg = resume_config(run_dir, over, keys, force=args.force)
    elif args.force:
        raise DDPMError("--force only applies with --resume RUN_DIR (to change a stored config key)")
    else:
        run_dir, cfg = None, load_config(args.config or "mnist", args.overrides)
    if args.print_config:
        print(format_config(cfg), end="")
        return 0
    try:
        train(cfg, run_dir=run_dir, resume=run_dir is not None, progress=not args.no_progress)
    except torch.OutOfMemoryError:
        raise DDPMError(
            f"out of GPU memory with train.batch_size={cfg.train.batch_size}; the last checkpoint is intact. "
            "Start a new run with a smaller train.batch_size or model (model.base_channels), or "
            "train.mixed_precision=bf16") from None
    return 0


def _config_keys() -> List[str]:
    return [f"{section}.{key}" for section, keys in Config().to_dict().items() if isinstance(keys, dict)
            for key in keys]


def _option_hint(words: Sequence[str], unknown: Sequence[str]) -> str:
    """For `ddpm train --steps 100`: 'config keys are written key=value: did you mean train.steps=100?'.

    ``words``: the command line (the value may follow the option); ``unknown``: what argparse left.
    """
    keys = _config_keys()
    for i, word in enumerate(words):
        if not word.startswith("--") or word not in unknown:
            continue
        name, _, value = word[2:].partition("=")
        if not value and i + 1 < len(words) and not words[i + 1].startswith("-") and "=" not in words[i + 1]:
            value = words[i + 1]
        name = name.replace("-", "_")
        exact = [k for k in keys if k == name or k.split(".", 1)[1] == name]
        close = exact or difflib.get_close_matches(name, keys, n=1) or difflib.get_close_matches(
            name, [k.split(".", 1)[1] for k in keys], n=1)
        if close:
            key = next(k for k in keys if k == close[0] or k.split(".", 1)[1] == close[0])
            return f"; config keys are written key=value: did you mean {key}={value or '...'}?"
    return ""


# ------------------------------------------------------------------------------ sampling commands

def _device(args) -> torch.device:
    return resolve_device(args.device, "--device")


def _check_n(n: int) -> None:
    if n < 1:
        raise DDPMError(f"--n must be at least 1, got {n}")


def _plan(args, run: Run, n: int, **kwargs) -> SamplingPlan:
    """The sampler call the sampling options of ``args`` ask for (see :func:`ddpmlab.runs.plan_sampling`)."""
    options = {"eta": getattr(args, "eta", None), "variance": getattr(args, "variance", None)}
    return plan_sampling(run, args.sampler, args.steps, n, timesteps=args.timesteps, options=options,
                         label=getattr(args, "label", None), guidance=getattr(args, "guidance", None), seed=args.seed,
                         names=NAMES, **kwargs)


def _fail_fast(args) -> None:
    """A bad sampler or step-schedule name fails before anything is loaded."""
    get_spec(args.sampler, "--sampler").check_step_schedule(args.timesteps, "--timesteps")
    if getattr(args, "variance", None) is not None:
        variance_name(args.variance, "--variance")


def cmd_sample(args) -> int:
    _check_n(args.n)
    _fail_fast(args)
    if (args.run_dir is None) == (args.from_diffusers is None):
        raise DDPMError("give either RUN_DIR (a ddpmlab run) or --from-diffusers FOLDER (a local diffusers model)")
    if args.from_diffusers and args.weights_file:
        raise DDPMError("--weights-file belongs to a ddpmlab run; --from-diffusers reads the folder's own weights")
    device = _device(args)
    run = (load_diffusers_run(args.from_diffusers, device) if args.from_diffusers else
           load_run(args.run_dir, args.weights, device, weights_file=args.weights_file))
    plan = _plan(args, run, args.n)
    output = resolve_output(args.out, run.folder("samples") / f"{plan.tag(args.seed)}.png", "--out")
    x = draw_samples(run, plan, args.n, seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress)
    if args.npz:  # the raw samples first: a picture that cannot be written loses nothing
        print(f"wrote {write_raw(x, output)} (samples: {tuple(x.shape)}, values in the data's scale)")
    save_samples(run, x, output, title=plan.describe())
    print(f"wrote {output.picture}" + (f" and {len(x)} PNG files (000000.png ...) beside it" if output.is_folder
                                       else ""))
    return 0


def _image_run(args, command: str) -> Run:
    _check_n(args.n)
    run = load_run(args.run_dir, args.weights, _device(args))
    if not run.is_image:
        raise DDPMError(f"ddpm {command} works on image models; {args.run_dir} was trained on 2-D points")
    return run


def _write_row(run: Run, row: torch.Tensor, results: torch.Tensor, out, default: Path) -> Path:
    """The comparison row (input, [mask,] results) as one PNG; for a folder also each result as a PNG."""
    output = resolve_output(out, default, "--out")
    save_grid(row, output.picture, nrow=len(row), scale=grid_scale(run.shape))
    if output.is_folder:
        save_images(results, output.path)
    return output.picture


def cmd_inpaint(args) -> int:
    get_spec("ddpm").check_step_schedule(args.timesteps, "--timesteps")  # RePaint steps as ddpm does
    run = _image_run(args, "inpaint")
    if not 1 <= args.steps <= run.T:
        raise DDPMError(f"--steps must be between 1 and {run.T} (the model's num_timesteps), got {args.steps}")
    variance = variance_name(args.variance or run.cfg.diffusion.variance, "--variance")
    image = load_picture(args.image, run.shape, args.resize, "--image", "--resize")
    mask = load_mask(args.mask, run.shape[1:], args.resize, "--mask", "--resize")
    model, labels = conditioning(run.model, args.n, args.label, args.guidance, run.cfg.train.label_dropout, NAMES)
    x = inpaint(model, run.schedule, image, mask, args.n, prediction=run.cfg.diffusion.prediction, labels=labels,
                steps=args.steps, jump_length=args.jump_length, jump_n_sample=args.jump_n_sample, variance=variance,
                spacing=args.timesteps or "uniform", seed=args.seed, batch_size=args.batch_size, device=run.device,
                progress=not args.no_progress)
    tag = condition_tag(args.label, args.guidance)
    default = run.folder("samples") / f"inpaint_{Path(args.image).stem}_seed{args.seed}{tag}.png"
    path = _write_row(run, comparison_row(image, x, mask), x, args.out, default)
    print(f"wrote {path} (input, mask, {args.n} inpaintings)")
    return 0


def cmd_img2img(args) -> int:
    _fail_fast(args)
    run = _image_run(args, "img2img")
    n0 = strength_to_steps(args.strength, run.T)
    plan = _plan(args, run, args.n, schedule_len=max(n0, 1))
    image = load_picture(args.image, run.shape, args.resize, "--image", "--resize")
    x = img2img(plan.model, run.schedule, image, args.strength, args.n, sampler=plan.sampler, steps=plan.steps,
                prediction=run.cfg.diffusion.prediction, labels=plan.labels, seed=args.seed,
                batch_size=args.batch_size, device=run.device, progress=not args.no_progress, **plan.options)
    default = (run.folder("samples") / f"img2img_{Path(args.image).stem}_strength{args.strength:g}_"
               f"seed{args.seed}{plan.condition_tag()}.png")
    path = _write_row(run, comparison_row(image, x), x, args.out, default)
    print(f"wrote {path} (input, {args.n} results; noised to t0 = {n0} of {run.T}, "
          f"{min(plan.steps, n0)} {plan.sampler} steps back)")
    return 0


# ------------------------------------------------------------------------------ eval, bench, viz, export, data

def cmd_eval(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS and m not in METRICS]
    if unknown:
        raise DDPMError(f"unknown metric(s) {', '.join(unknown)} in --metrics; choose from "
                        f"{', '.join(EVAL_METRICS + tuple(METRICS))}")
    device = _device(args)
    if "nll" in metrics:
        result, js, png = evaluate_nll(args.run_dir, n=args.n, decoder=args.decoder, bin_width=args.bin_width,
                                       t_stride=args.t_stride, batch_size=args.batch_size, seed=args.seed,
                                       weights=args.weights, device=device, progress=not args.no_progress)
        print(format_nll(result))
        print(f"wrote {js} and {png}")
    quality = [m for m in metrics if m not in EVAL_METRICS]
    if quality or not metrics:  # no --metrics: the sample-quality defaults of the data kind
        _fail_fast(args)
        _eval_sample_quality(args, quality, device)
    return 0


def _eval_sample_quality(args, metrics: List[str], device: torch.device) -> None:
    """FID/KID/IS/precision-recall (images) or SWD/MMD (2-D) of samples, beside n data points."""
    extractor = args.extractor or ("inception" if args.inception_weights else "classifier")
    s = EvalSettings(metrics=metrics, n=args.n or 1000, sampler=args.sampler, steps=args.steps,
                     sampler_options={"eta": args.eta, "variance": args.variance}, timesteps=args.timesteps,
                     guidance=args.guidance, seed=args.seed, batch_size=args.batch_size, extractor=extractor,
                     inception_weights=args.inception_weights, weights=args.weights, baseline=not args.no_baseline)
    results, path = evaluate_run(args.run_dir, s, device, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                 progress=not args.no_progress, out=args.out, names=NAMES)
    st, run = results["settings"], results["run"]
    what = f", {results['extractor']['name']} features" if "extractor" in results else ""
    print(f"{args.run_dir} ({run['checkpoint']}, {run['weights']}): {st['n']} samples, {st['sampler']} "
          f"{st['steps']} steps, seed {st['seed']}{what}")
    print(format_results(results))
    print(f"wrote {path}")


def cmd_bench(args) -> int:
    entries = [bench.BenchEntry.parse(s, "--samplers") for s in args.samplers.split(",") if s.strip()]
    nfes = bench.parse_nfes(args.nfe, "--nfe")
    if (args.run_dir is None) == (args.analytic is None):
        raise DDPMError("give either RUN_DIR (a trained run) or --analytic mixture2d|mixture64d")
    if args.n is not None and args.n < 2:
        raise DDPMError(f"--n must be at least 2, got {args.n}")
    if args.analytic:
        res = bench.bench_analytic(args.analytic, entries, nfes, n=args.n or 20000, seed=args.seed)
        out = Path(args.out or f"runs/bench-{args.analytic}")
    else:
        res = bench.bench_run(args.run_dir, entries, nfes, n=args.n or 256, seed=args.seed,
                              reference_steps=args.reference_steps, batch_size=args.batch_size,
                              device=_device(args), weights=args.weights, names=NAMES)
        out = Path(args.out or Path(args.run_dir) / "bench")
    print(bench.markdown_table(res))
    for path in bench.save(res, out):
        print(f"wrote {path}")
    return 0


def cmd_viz(args) -> int:
    kind = args.viz_command
    if kind == "forward":
        ts = [int(t) for t in args.t.split(",")] if args.t else None
        files = viz.viz_forward(args.run_dir, args.config, args.n, ts, args.seed, args.out)
    elif kind == "schedules":
        names = [s.strip() for s in args.schedules.split(",") if s.strip()]
        files = viz.viz_schedules(names, args.T, args.beta_start, args.beta_end, args.out)
    elif kind == "loss":
        files = viz.viz_loss(args.run_dirs, args.smooth, args.out)
    elif kind == "grid" and args.npz:
        files = viz.grid_from_npz(args.npz, args.out)
    elif kind == "toy" and not args.run_dir:
        files = viz.viz_toy(None, None, args.config, args.n, args.seed, args.frames, args.out)
    else:
        files = _viz_sampling(args, kind)
    for f in files:
        print(f"wrote {f}")
    return 0


def _viz_sampling(args, kind: str) -> List[Path]:
    """viz reverse / toy / grid of a run: the run, its sampler call, then the pictures."""
    if not args.run_dir:
        raise DDPMError(f"ddpm viz {kind} needs RUN_DIR" + (" (to sample) or --npz FILE" if kind == "grid" else ""))
    _check_n(args.n)
    _fail_fast(args)
    run = load_run(args.run_dir, args.weights, _device(args))
    plan = _plan(args, run, args.n, cycle_classes=True)
    if kind == "reverse":
        return viz.viz_reverse(run, plan, args.n, args.seed, args.frames, args.out)
    if kind == "toy":
        return viz.viz_toy(run, plan, None, args.n, args.seed, args.frames, args.out)
    return viz.viz_grid(run, plan, args.n, args.seed, args.out, args.batch_size, not args.no_progress)


def cmd_export(args) -> int:
    require_run_dir(args.run_dir)
    out = export_diffusers(args.run_dir, args.out, which=args.weights)
    print(f"wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    return 0


def cmd_data_check(args) -> int:
    return check_folder(args.dir, tuple(args.image_size), args.channels, limit=args.limit)


# ------------------------------------------------------------------------------ the parser

SAMPLERS_HELP = ", ".join(SAMPLER_SPECS)
VARIANCE_HELP = (f"reverse variance of ddpm: {', '.join(VARIANCES)} (or "
                 f"{', '.join(f'{a}' for a in VARIANCE_ALIASES)}); default: the run's diffusion.variance")


def _run_options(p: argparse.ArgumentParser, batch_size: int, seed: bool = True) -> None:
    """Options every command that loads a run shares."""
    if seed:
        p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per batch (default {batch_size})")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto (default: cuda, mps or cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sampling_options(p: argparse.ArgumentParser, sampler: str = "ddim", conditional: bool = True) -> None:
    """The options of one sampler call (see ddpmlab.runs.plan_sampling)."""
    p.add_argument("--sampler", default=sampler, help=f"one of: {SAMPLERS_HELP} (default {sampler})")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps = model evaluations (default: all timesteps for ddpm, 50 otherwise)")
    p.add_argument("--timesteps", default=None, metavar="NAME",
                   help=f"step schedule: {', '.join(STEP_SCHEDULES)}; ddpm and ddim take uniform, leading or "
                        "trailing; optimized is fitted to this model on calibration noise first; default: the "
                        "sampler's own (ddim: uniform, dpmpp/unipc: logsnr, euler/heun: karras)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--variance", default=None, help=VARIANCE_HELP)
    if conditional:
        p.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
        p.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                       help="classifier-free guidance scale (conditional models): 1 conditional, 0 unconditional, "
                            ">1 stronger; without --class the samples cycle through all classes")


def _train_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="train a model (default: the quick MNIST config)",
        description="Train a DDPM. With no arguments: the bundled MNIST digits (configs/mnist.yaml).\n"
                    "Override any config key as key=value, e.g. train.steps=2000 model.base_channels=64;\n"
                    "--print-config shows the resolved config without training.",
        epilog="Config keys (section.key, type, default):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML file or bundled config name (mnist, toy2d, cifar10); default: mnist")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its newest checkpoint")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--force", action="store_true",
                   help="with --resume: allow changing stored config keys (e.g. train.lr after a divergence)")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    t.set_defaults(func=cmd_train, parser=t)


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run and write a PNG grid (images) or a scatter plot (2D data).")
    s.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a folder written by `ddpm train`")
    s.add_argument("--from-diffusers", metavar="FOLDER",
                   help="sample a local diffusers UNet2DModel + scheduler folder instead of a run (e.g. a downloaded "
                        "google/ddpm-cifar10-32; nothing is downloaded); output goes to ./samples/")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    _sampling_options(s)
    _run_options(s, batch_size=256)
    s.add_argument("--weights-file", metavar="FILE",
                   help="use these weights with RUN_DIR's config: .safetensors, or a PyTorch state dict "
                        "(loaded with weights_only=True: pickles that would run code are refused)")
    s.add_argument("--out", help="a picture file (.png, ...) or a folder (one PNG per sample plus grid.png); "
                                 "default RUN_DIR/samples/<sampler>_<steps>steps_seed<seed>.png")
    s.add_argument("--npz", action="store_true", help="also save the raw samples as .npz (written first)")
    s.set_defaults(func=cmd_sample, parser=s)


def _edit_parser(sub, name: str, help: str, description: str):
    e = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train` (an image model)")
    e.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...); converted to the model's channels")
    e.add_argument("--resize", action="store_true",
                   help="scale and center-crop the input(s) to the model's image size (default: sizes must match)")
    e.add_argument("--n", type=int, default=4, help="number of results (default 4)")
    _run_options(e, batch_size=64)
    return e


def _editing_parsers(sub) -> None:
    ip = _edit_parser(sub, "inpaint", "fill a masked region of an image (RePaint)",
                      "Fill the white region of --mask in --image with a trained model (RePaint, Lugmayr et al. "
                      "2022): the black region is kept exactly. Writes one row: input, mask, then the --n results.\n"
                      "The mask is a PNG of the same size as the image: white (> 50% grey) = fill, black = keep.")
    ip.add_argument("--mask", required=True, help="PNG mask, same size as the image: white = fill, black = keep")
    ip.add_argument("--steps", type=int, default=250, help="respaced diffusion steps (default 250, as the paper)")
    ip.add_argument("--timesteps", default=None, metavar="NAME",
                    help="which timesteps the respaced steps use: uniform (default), leading or trailing")
    ip.add_argument("--variance", default=None, help=VARIANCE_HELP)
    ip.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
    ip.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                    help="classifier-free guidance scale (conditional models)")
    ip.add_argument("--jump-length", type=int, default=10,
                    help="resampling: go back this many steps at each jump point (default 10)")
    ip.add_argument("--jump-n-sample", type=int, default=10,
                    help="resampling: denoise each stretch this many times (default 10; 1 = no resampling)")
    ip.add_argument("--out", help="picture file or folder (default RUN_DIR/samples/inpaint_<image>_seed<seed>.png)")
    ip.set_defaults(func=cmd_inpaint, parser=ip)

    ii = _edit_parser(sub, "img2img", "redraw an image from a noised copy (SDEdit)",
                      "SDEdit (Meng et al. 2022): noise --image to t0 = strength * T, then denoise it back with "
                      "any sampler. strength 0 returns the input, 1 ignores it. Writes one row: input, then the "
                      "--n results.")
    ii.add_argument("--strength", type=float, default=0.5, help="how far to noise, in [0, 1] (default 0.5)")
    _sampling_options(ii)
    ii.add_argument("--out", help="picture file or folder "
                                  "(default RUN_DIR/samples/img2img_<image>_strength<s>_seed<seed>.png)")
    ii.set_defaults(func=cmd_img2img, parser=ii)


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


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained run (FID/KID/IS/precision-recall, SWD/MMD, NLL)",
                        description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ev.add_argument("--metrics", default="",
                    help="comma-separated list of fid, kid, is, pr, acc (images), swd, mmd (2-D), nll "
                         "(default: fid,kid,is,pr for images, swd,mmd for 2-D; acc too for conditional runs)")
    ev.add_argument("--n", type=int, default=None,
                    help="samples to draw for the quality metrics (default 1000); for nll the number of held-out "
                         "examples (default: the whole test split; 5000 fresh 2-D points)")
    _sampling_options(ev)
    ev.add_argument("--extractor", default=None, choices=["classifier", "inception"],
                    help="feature network (default: classifier, or inception when --inception-weights is given)")
    ev.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="local FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth or .safetensors)")
    ev.add_argument("--cache-dir", default=None,
                    help="reference-statistics cache (default $DDPMLAB_CACHE or ~/.cache/ddpmlab)")
    ev.add_argument("--no-cache", action="store_true", help="recompute the reference statistics, store nothing")
    ev.add_argument("--no-baseline", action="store_true", help="skip the same metrics of --n data points")
    ev.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval/step..._<sampler>..._n<n>.json)")
    ev.add_argument("--decoder", default="discretized", choices=["discretized", "continuous"],
                    help="nll: p(x_0|x_1) a discretized Gaussian (Eq. 13; 8-bit data, or give --bin-width) or "
                         "the continuous density (a differential NLL, for 2-D points)")
    ev.add_argument("--bin-width", type=float, default=None,
                    help="nll: bin width of non-8-bit data on the model's scale, e.g. 0.125 for the 17-level digits")
    ev.add_argument("--t-stride", type=int, default=1,
                    help="nll: one random t in every block of this many (an unbiased estimate; default 1: all T)")
    _run_options(ev, batch_size=250)
    ev.set_defaults(func=cmd_eval, parser=ev)


def _export_and_data_parsers(sub) -> None:
    ex = sub.add_parser("export", help="write a run in another library's format (diffusers)",
                        description="Export a trained run. --format diffusers writes a folder that "
                                    "diffusers.DDPMPipeline.from_pretrained(OUT) loads (UNet2DModel + DDPMScheduler, "
                                    "safetensors); options UNet2DModel cannot express are refused by name.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ex.add_argument("out", metavar="OUT", help="new output folder")
    ex.add_argument("--format", default="diffusers", choices=["diffusers"], help="output format (default diffusers)")
    ex.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    ex.set_defaults(func=cmd_export, parser=ex)

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
    dc.set_defaults(func=cmd_data_check, parser=dc)


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


def _viz_sampling_parser(vs, name: str, help: str, description: str, sampler: str = "ddim", n: int = 16,
                         run_required: bool = True):
    p = vs.add_parser(name, help=help, description=description)
    p.add_argument("run_dir", metavar="RUN_DIR", nargs=None if run_required else "?", help="a run written by "
                   "`ddpm train`")
    _sampling_options(p, sampler, conditional=False)
    p.add_argument("--n", type=int, default=n, help=f"number of samples (default {n})")
    _run_options(p, batch_size=256)
    p.add_argument("--out", help="output folder (default RUN_DIR/viz)")
    p.set_defaults(parser=p)
    return p


def _viz_parser(sub) -> None:
    v = sub.add_parser("viz", help="pictures: forward/reverse process, schedules, 2-D toy, loss, grids",
                       description=VIZ_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.set_defaults(func=cmd_viz, parser=v)
    vs = v.add_subparsers(dest="viz_command", metavar="KIND", required=True)
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
    f.set_defaults(parser=f)

    r = _viz_sampling_parser(vs, "reverse", "GIF and stills of x_t and the predicted x0 along sampling",
                             "Sample --n images and record --frames snapshots of x_t (left) and of the model's "
                             "prediction of x_0 (right): reverse_<sampler><steps>.gif and .png.")
    r.add_argument("--frames", type=int, default=25, help="snapshots along sampling (default 25)")

    sc = vs.add_parser("schedules", help="beta_t, alpha_bar_t and log-SNR of the noise schedules",
                       description="Three panels side by side: beta_t (log scale), alpha_bar_t and "
                                   "log-SNR = log(alpha_bar / (1 - alpha_bar)) against t, one line per schedule.")
    sc.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated (default {','.join(SCHEDULES)})")
    sc.add_argument("--T", type=int, default=1000, help="number of timesteps (default 1000)")
    sc.add_argument("--beta-start", type=float, default=1e-4)
    sc.add_argument("--beta-end", type=float, default=0.02)
    sc.add_argument("--out", help="output PNG or folder (default ./viz/schedules.png)")
    sc.set_defaults(parser=sc)

    ty = _viz_sampling_parser(vs, "toy", "2-D data, forward diffusion and reverse process (stills and GIF)",
                              "toy_data.png, toy_forward.png; with a RUN_DIR also toy_reverse.png (samples along "
                              "the reverse process over the data in grey) and toy_diffusion.gif (forward, then "
                              "reverse).", sampler="ddpm", n=2000, run_required=False)
    ty.add_argument("--config", default=None, help="config when no RUN_DIR (default toy2d)")
    ty.add_argument("--frames", type=int, default=25, help="reverse-process snapshots (default 25)")

    lo = vs.add_parser("loss", help="training loss curves (and eval metrics) of one or more runs",
                       description="Loss from RUN_DIR/log.csv (raw, and smoothed by an exponential moving "
                                   "average), and the metrics of RUN_DIR/eval.csv (train.eval_every) beside it.")
    lo.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="runs written by `ddpm train`")
    lo.add_argument("--smooth", type=float, default=0.8, help="EMA weight of the smoothed curve (default 0.8)")
    lo.add_argument("--out", help="output PNG or folder (default RUN_DIR/viz/loss.png of the first run)")
    lo.set_defaults(parser=lo)

    g = _viz_sampling_parser(vs, "grid", "a grid of samples (fresh, or from `ddpm sample --npz`)",
                             "Sample a run and write a grid (images) or scatter plot (2-D), or draw the samples "
                             "of an .npz file written by `ddpm sample --npz`.", n=64, run_required=False)
    g.add_argument("--npz", default=None, help="samples saved by `ddpm sample --npz` instead of sampling")


def _bench_parser(sub) -> None:
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
    bs.add_argument("--samplers", default=",".join(bench.DEFAULT_SAMPLERS),
                    help="comma-separated NAME or NAME:TIMESTEPS, e.g. dpmpp_2m:karras,unipc:optimized "
                         f"(default {','.join(bench.DEFAULT_SAMPLERS)})")
    bs.add_argument("--nfe", default="5,10,20,50", help="model evaluations to test (default 5,10,20,50)")
    bs.add_argument("--n", type=int, default=None, help="samples per set (default 256 for a run, 20000 analytic)")
    bs.add_argument("--reference-steps", type=int, default=1000, help="ancestral steps of the reference (default 1000)")
    _run_options(bs, batch_size=256)
    bs.add_argument("--out", help="output folder")
    bs.set_defaults(func=cmd_bench, parser=bs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm", description="ddpmlab: train, sample and study denoising diffusion probabilistic models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_parser, _sample_parser, _editing_parsers, _eval_parser, _export_and_data_parsers,
                _viz_parser, _bench_parser):
        add(sub)
    return p


# ------------------------------------------------------------------------------ main

def _format_warning(message, category, filename, lineno, line=None, _default=warnings.formatwarning) -> str:
    """ddpmlab's own warnings (skipped images, damaged checkpoints) as plain 'warning: ...' lines."""
    if f"{Path(__file__).parent}" in str(filename):
        return f"warning: {message}\n"
    return _default(message, category, filename, lineno, line)


def _parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come before or after options: collect the ones argparse left
    if extra and getattr(args, "overrides", None) is not None and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = list(args.overrides) + extra
    elif extra:
        sub = getattr(args, "parser", parser)
        words = list(sys.argv[1:] if argv is None else argv)
        hint = _option_hint([w for w in words if w in extra or not w.startswith("-")], extra) \
            if args.command == "train" else ""
        sub.error(f"unrecognized arguments: {' '.join(extra)}{hint}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    warnings.formatwarning = _format_warning
    if args.command != "train":  # train decides by train.keep_freed_memory and the device
        keep_freed_memory()  # CPU sampling and evaluation reuse freed memory (ddpmlab.training.allocator)
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
