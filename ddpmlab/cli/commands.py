"""What each ``ddpm`` subcommand does: read its arguments, call the library, say what it wrote.

Every rule about runs and sampling (device, loading, default steps, the run's variance, which
options a sampler takes, output paths) lives in :mod:`ddpmlab.runs`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image
from safetensors.torch import save_file

from ddpmlab.config import Config, format_config, load_config
from ddpmlab.data import to_uint8
from ddpmlab.data.check import check_folder
from ddpmlab.demo import serve as serve_demo
from ddpmlab.diffusion.reverse import variance_name
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate import METRICS, EvalSettings, bench, evaluate_run, format_results
from ddpmlab.evaluate.nll import evaluate_nll, format_nll
from ddpmlab.evaluate.superres import evaluate_superres, format_superres, save_superres
from ddpmlab.io.checkpoint import load_run_config, require_run_dir
from ddpmlab.io.diffusers_bridge import export_diffusers
from ddpmlab.io.images import comparison_row, load_mask, load_picture, save_grid, save_images
from ddpmlab.io.latent_export import export_latent_run
from ddpmlab.models.conditioned import condition_from_low_res, upsample
from ddpmlab.runs import (
    Output,
    Run,
    SamplingPlan,
    condition_tag,
    draw_samples,
    edit_conditioning,
    edit_img2img,
    edit_inpaint,
    grid_scale,
    load_autoencoder,
    load_diffusers_run,
    load_run,
    plan_sampling,
    resolve_device,
    resolve_output,
    write_raw,
)
from ddpmlab.samplers.editing import strength_to_steps
from ddpmlab.samplers.registry import get_spec
from ddpmlab.training.tasks.autoencoder import train_autoencoder
from ddpmlab.training.tasks.distill import distill_run
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.posthoc_ema import reconstruct
from ddpmlab.training.run_folder import resume_config
from ddpmlab.viz import commands as viz
from ddpmlab.viz.samples import save_samples

# how a user sets each option on the command line, for the library's messages
NAMES = {"sampler": "--sampler", "steps": "--steps", "timesteps": "--timesteps", "eta": "--eta",
         "variance": "--variance", "class": "--class", "guidance": "--guidance", "weights": "--weights",
         "n": "--n", "threshold": "--threshold", "metrics": "--metrics", "extractor": "--extractor",
         "inception_weights": "--inception-weights PATH", "reference_steps": "--reference-steps"}
EVAL_METRICS = ("nll",)  # metrics with their own code path; the others come from ddpmlab.evaluate.METRICS


# ------------------------------------------------------------------------------ train

def cmd_train(args) -> int:
    """ddpm train: a diffusion run, or the autoencoder of latent diffusion where the config says stage: autoencoder."""
    return _train_command(args, "mnist", stage=None)


def cmd_train_autoencoder(args) -> int:
    """The first stage of latent diffusion: as cmd_train, but the run trains cfg.autoencoder."""
    return _train_command(args, "mnist_autoencoder", stage="autoencoder")


def _train_command(args, default_config: str, stage) -> int:
    if args.resume:
        run_dir = require_run_dir(args.resume)
        if args.config:
            raise DDPMError("--config cannot be combined with --resume (the run keeps its stored config.yaml)")
        over = load_config(None, args.overrides) if args.overrides else None
        keys = [o.split("=", 1)[0].strip() for o in args.overrides]
        cfg = resume_config(run_dir, over, keys, force=args.force, force_option="--force")
        if stage == "autoencoder" and cfg.stage != "autoencoder":
            raise DDPMError(f"{run_dir} is a diffusion run, not an autoencoder run; continue it with "
                            f"`ddpm train --resume {run_dir}`")
    elif args.force:
        raise DDPMError("--force only applies with --resume RUN_DIR (to change a stored config key)")
    else:
        run_dir, cfg = None, load_config(args.config or default_config, args.overrides)
        cfg.stage = stage or cfg.stage
    if args.print_config:
        print(format_config(cfg), end="")
        return 0
    if cfg.stage == "autoencoder":
        train_autoencoder(cfg, run_dir=run_dir, resume=run_dir is not None, progress=not args.no_progress)
        return 0
    try:
        train(cfg, run_dir=run_dir, resume=run_dir is not None, progress=not args.no_progress)
    except torch.OutOfMemoryError:
        raise DDPMError(
            f"out of GPU memory with train.batch_size={cfg.train.batch_size}; the last checkpoint is intact. "
            "Start a new run with a smaller train.batch_size or model (model.base_channels), or "
            "train.mixed_precision=bf16") from None
    return 0


def cmd_distill(args) -> int:
    """ddpm distill RUN --method M --steps K [key=value ...], or --resume STUDENT_RUN."""
    if (args.run_dir is None) == (args.resume is None):
        raise DDPMError("give either RUN (the teacher run to distill) or --resume STUDENT_RUN")
    if args.resume and (args.overrides or args.steps is not None):
        raise DDPMError("--resume continues a distillation with its stored config.yaml; drop --steps and key=value")
    distill_run(args.run_dir, args.method, args.steps, args.overrides, resume_dir=args.resume,
                progress=not args.no_progress)
    return 0


def _config_keys() -> List[str]:
    return [f"{section}.{key}" for section, keys in Config().to_dict().items() if isinstance(keys, dict)
            for key in keys]


def option_hint(words: Sequence[str], unknown: Sequence[str]) -> str:
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
    options = {"eta": getattr(args, "eta", None), "variance": getattr(args, "variance", None),
               "threshold": getattr(args, "threshold", None)}
    return plan_sampling(run, args.sampler, args.steps, n, timesteps=args.timesteps, options=options,
                         label=getattr(args, "label", None), guidance=getattr(args, "guidance", None), seed=args.seed,
                         names=NAMES, **kwargs)


def _fail_fast(args) -> None:
    """A bad sampler or step-schedule name fails before anything is loaded."""
    if args.sampler is not None:  # None (ddpm sample): the run's recommendation, checked once it is loaded
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


def _write_row(run: Run, row: torch.Tensor, results: torch.Tensor, output: Output) -> Path:
    """The comparison row (input, [mask,] results) as one PNG; for a folder also each result as a PNG."""
    save_grid(row, output.picture, nrow=len(row), scale=grid_scale(run.image_shape))
    if output.is_folder:
        save_images(results, output.path)
    return output.picture


def cmd_inpaint(args) -> int:
    get_spec("ddpm").check_step_schedule(args.timesteps, "--timesteps")  # RePaint steps as ddpm does
    run = _image_run(args, "inpaint")
    if not 1 <= args.steps <= run.T:
        raise DDPMError(f"--steps must be between 1 and {run.T} (the model's num_timesteps), got {args.steps}")
    variance = variance_name(args.variance or run.cfg.diffusion.variance, "--variance")
    image = load_picture(args.image, run.image_shape, args.resize, "--image", "--resize")
    mask = load_mask(args.mask, run.image_shape[1:], args.resize, "--mask", "--resize")
    model, labels, guidance = edit_conditioning(run, args.n, args.label, args.guidance, NAMES)
    tag = condition_tag(args.label, guidance)
    default = run.folder("samples") / f"inpaint_{Path(args.image).stem}_seed{args.seed}{tag}.png"
    output = resolve_output(args.out, default, "--out")  # before sampling: a bad --out costs nothing
    x = edit_inpaint(run, model, image, mask, args.n, labels=labels, steps=args.steps, jump_length=args.jump_length,
                     jump_n_sample=args.jump_n_sample, variance=variance, spacing=args.timesteps or "uniform",
                     seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress)
    path = _write_row(run, comparison_row(image, x, mask), x, output)
    print(f"wrote {path} (input, mask, {args.n} inpaintings)")
    return 0


def cmd_img2img(args) -> int:
    _fail_fast(args)
    run = _image_run(args, "img2img")
    n0 = strength_to_steps(args.strength, run.T)
    plan = _plan(args, run, args.n, schedule_len=max(n0, 1))
    image = load_picture(args.image, run.image_shape, args.resize, "--image", "--resize")
    default = (run.folder("samples") / f"img2img_{Path(args.image).stem}_strength{args.strength:g}_"
               f"seed{args.seed}{plan.condition_tag()}.png")
    output = resolve_output(args.out, default, "--out")  # before sampling: a bad --out costs nothing
    x = edit_img2img(run, plan, image, args.strength, args.n, seed=args.seed, batch_size=args.batch_size,
                     progress=not args.no_progress)
    path = _write_row(run, comparison_row(image, x), x, output)
    print(f"wrote {path} (input, {args.n} results; noised to t0 = {n0} of {run.T}, "
          f"{min(plan.steps, n0)} {plan.sampler} steps back)")
    return 0


def _save_picture(image: torch.Tensor, path: Path) -> Path:
    """One image (C, H, W) in [-1, 1] as an 8-bit picture of exactly H x W pixels."""
    arr = to_uint8(image[None])[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
    return path


def _picture_size(path) -> Optional[Tuple[int, int]]:
    """(width, height) of a picture file, None when it cannot be read (load_picture then says why)."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError):
        return None


def cmd_upscale(args) -> int:
    """Super-resolution: the run's upscales of a low-res picture (SR3 sampling, Saharia et al. 2021)."""
    _check_n(args.n)
    _fail_fast(args)
    run = load_run(args.run_dir, args.weights, _device(args))
    if run.cfg.model.condition == "none":
        raise DDPMError(f"ddpm upscale needs a super-resolution run (trained with model.condition=low_res); "
                        f"{args.run_dir} is not one: sample it with `ddpm sample {args.run_dir}`")
    c, h, w = run.shape
    lh, lw = run.cfg.data.low_res
    size = _picture_size(args.image)
    if size is not None and size != (lw, lh):
        raise DDPMError(f"--image '{args.image}' is {size[0]}x{size[1]} pixels but {args.run_dir} upscales "
                        f"{lw}x{lh} pictures (data.low_res, width x height) to {w}x{h}; give a {lw}x{lh} picture")
    low = load_picture(args.image, (c, lh, lw), what="--image")[None]
    plan = _plan(args, run, args.n, cond=condition_from_low_res(low, run.cfg, (h, w)))
    default = run.folder("samples") / f"upscale_{Path(args.image).stem}_{plan.tag(args.seed)}.png"
    output = resolve_output(args.out, default, "--out")  # before sampling: a bad --out costs nothing
    x = draw_samples(run, plan, args.n, seed=args.seed, batch_size=args.batch_size, progress=not args.no_progress)
    if output.is_folder or args.n > 1:  # a row: the input (nearest pixels), then the upscales
        save_grid(torch.cat([upsample(low, (h, w), "nearest"), x]), output.picture, nrow=args.n + 1,
                  scale=grid_scale(run.shape))
        if output.is_folder:
            save_images(x, output.path)
    else:  # one upscale: the picture itself, at the run's image size
        _save_picture(x[0], output.picture)
    what = f"{w}x{h} upscale{'s' if args.n > 1 else ''} of the {lw}x{lh} {args.image}"
    print(f"wrote {output.picture} ({args.n} {what}; {plan.describe()})")
    return 0


# ------------------------------------------------------------------------------ eval, bench, viz, export, data

def cmd_eval(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS and m not in METRICS]
    if unknown:
        raise DDPMError(f"unknown metric(s) {', '.join(unknown)} in --metrics; choose from "
                        f"{', '.join(EVAL_METRICS + tuple(METRICS))}")
    device = _device(args)
    if load_run_config(require_run_dir(args.run_dir)).model.condition != "none":
        return _eval_superres(args, metrics, device)  # super-resolution: PSNR, SSIM, FID of upscales
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


def _eval_superres(args, metrics: List[str], device: torch.device) -> int:
    """A super-resolution run: its upscales of held-out low-res images against the truth, beside bicubic."""
    if metrics:
        raise DDPMError(f"--metrics {args.metrics}: a super-resolution run is scored by PSNR, SSIM and FID of its "
                        "upscales (all of them, always); drop --metrics")
    _fail_fast(args)
    run = load_run(args.run_dir, args.weights, device)
    extractor = args.extractor or ("inception" if args.inception_weights else "classifier")
    results, examples = evaluate_superres(
        run, args.n or 500, args.sampler, args.steps, seed=args.seed, batch_size=args.batch_size,
        options={"eta": args.eta, "variance": args.variance}, timesteps=args.timesteps, extractor=extractor,
        inception_weights=args.inception_weights, progress=not args.no_progress, names=NAMES)
    st, d = results["settings"], results["data"]
    tag = f"{run.checkpoint}_{args.weights}_{st['sampler']}{st['steps']}_n{d['n']}_seed{st['seed']}"
    js, png = save_superres(results, examples, args.out or run.folder("eval") / f"superres_{tag}.json")
    print(f"{args.run_dir} ({run.checkpoint}, {args.weights}): {d['n']} upscales {d['low_res'][1]}x"
          f"{d['low_res'][0]} -> {d['high_res'][1]}x{d['high_res'][0]} of {d['images']}, {st['sampler']} "
          f"{st['steps']} steps, seed {st['seed']}")
    print(format_superres(results))
    print(f"wrote {js} and {png}")
    return 0


def _eval_sample_quality(args, metrics: List[str], device: torch.device) -> None:
    """FID/KID/IS/precision-recall (images) or SWD/MMD (2-D) of samples, beside n data points."""
    extractor = args.extractor or ("inception" if args.inception_weights else "classifier")
    s = EvalSettings(metrics=metrics, n=args.n or 1000, sampler=args.sampler, steps=args.steps,
                     sampler_options={"eta": args.eta, "variance": args.variance,
                                      "threshold": getattr(args, "threshold", None)}, timesteps=args.timesteps,
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
    if args.run_dir:
        path = bench.save_recommendation(res, args.run_dir)
        best = ", ".join(f"{k}: {v['sampler']}" + (f":{v['timesteps']}" if v["timesteps"] else "")
                         for k, v in bench.recommendation(res)["by_nfe"].items())
        print(f"wrote {path} (best per NFE: {best}); ddpm sample {args.run_dir} without --sampler uses it")
    return 0


def cmd_viz(args) -> int:
    kind = args.viz_command
    if kind == "forward":
        ts = [int(t) for t in args.t.split(",")] if args.t else None
        files = viz.viz_forward(args.run_dir, args.config, args.n, ts, args.seed, args.out, where="--t")
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


def cmd_ema(args) -> int:
    run_dir = require_run_dir(args.run_dir)
    weights, step, coefs = reconstruct(run_dir, args.sigma_rel, args.step or 0)
    load_run(run_dir, device="cpu").model.load_state_dict(weights)  # the weights fit the run's model
    name = f"posthoc_sigma{args.sigma_rel:.3f}_step{step:07d}.safetensors"
    out = Path(args.out) if args.out else run_dir / "ema" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out))
    print(f"wrote {out}: the power-function EMA with sigma_rel {args.sigma_rel:g} at step {step}, from "
          f"{len(coefs)} snapshots")
    print(f"sample it: ddpm sample {run_dir} --weights-file {out}")
    return 0


def cmd_export(args) -> int:
    cfg = load_run_config(require_run_dir(args.run_dir))
    if cfg.model.condition != "none":
        raise DDPMError(f"{args.run_dir} is a super-resolution run (model.condition=low_res); diffusers' "
                        "DDPMPipeline has no low-res input, so it is not exported")
    if cfg.model.autoencoder:  # the denoiser with its autoencoder, as an LDMPipeline or DiTPipeline
        out = export_latent_run(args.run_dir, args.out, load_autoencoder(cfg.model.autoencoder, "cpu"), args.weights)
        pipeline = "DiTPipeline" if cfg.model.kind == "dit" else "LDMPipeline"
        print(f"wrote {out}: load it with diffusers.{pipeline}.from_pretrained({str(out)!r})"
              + (" (class_labels=[...]; guidance_scale > 1 takes class 1000 as 'no label', so only with 1000 classes)"
                 if pipeline == "DiTPipeline" else ""))
        return 0
    out = export_diffusers(args.run_dir, args.out, which=args.weights)
    if (out / "transformer").is_dir():  # a DiT: no pipeline without a VAE
        print(f"wrote {out}: load it with diffusers.DiTTransformer2DModel.from_pretrained({str(out / 'transformer')!r})"
              f" and DDPMScheduler.from_pretrained({str(out / 'scheduler')!r}) (DiTPipeline needs a VAE)")
        return 0
    print(f"wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r})")
    return 0


def cmd_data_check(args) -> int:
    return check_folder(args.dir, tuple(args.image_size), args.channels, limit=args.limit)


def cmd_demo(args) -> int:
    serve_demo(args.run_dirs, host=args.host, port=args.port, max_samples=args.max_samples, max_steps=args.max_steps,
               queue_size=args.queue_size, device=args.device, out_root=args.out)
    return 0


# ------------------------------------------------------------------------------ the parser


# ------------------------------------------------------------------------------ main
