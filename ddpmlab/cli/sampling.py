"""``ddpm sample``, ``inpaint``, ``img2img`` and ``upscale``: read the options, ask the run layer, say what was written.

Every rule about runs and sampling (device, loading, the run's own sampler, steps and guidance,
which options a sampler takes, classes by name, output paths) lives in :mod:`ddpmlab.runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import torch
from PIL import Image

from ddpmlab.cli.options import listed_classes, sampling_request
from ddpmlab.data import to_uint8
from ddpmlab.data.images import open_image
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.mel_sound import with_vocoder
from ddpmlab.io.adapters import apply_adapters
from ddpmlab.io.images import comparison_row, load_mask, load_picture, save_grid, save_images
from ddpmlab.models.conditioned import condition_from_low_res, upsample
from ddpmlab.runs import (
    InpaintRequest,
    Output,
    Run,
    draw_inpainting,
    draw_samples,
    edit_img2img,
    grid_scale,
    load_diffusers_run,
    load_run,
    plan_img2img,
    plan_inpainting,
    plan_request,
    resolve_device,
    resolve_output,
    write_raw,
)
from ddpmlab.runs.control import with_controlnets
from ddpmlab.viz.samples import save_samples


def cmd_sample(args) -> int:
    request = sampling_request(args)
    request.check()  # a bad sampler or step schedule name fails before anything is loaded
    if (args.run_dir is None) == (args.from_diffusers is None):
        raise DDPMError("give either RUN_DIR (a ddpmlab run) or --from-diffusers FOLDER (a local diffusers model)")
    if args.from_diffusers and args.weights_file:
        raise DDPMError("--weights-file belongs to a ddpmlab run; --from-diffusers reads the folder's own weights")
    device = resolve_device(args.device)
    run = (load_diffusers_run(args.from_diffusers, device) if args.from_diffusers else
           load_run(args.run_dir, args.weights, device, weights_file=args.weights_file))
    for line in apply_adapters(run.model, args.lora, f"'{args.run_dir or args.from_diffusers}'"):
        print(f"LoRA adapter {line}")
    run = with_controlnets(run, args.controlnet, args.control, args.control_scale)
    run = with_vocoder(run, args.vocoder)  # a mel run's images made sound by a vocoder run, not Griffin-Lim
    if listed_classes(args, run):
        return 0
    plan = plan_request(run, request)
    control = f"control_{Path(args.control[0]).stem}_" if args.controlnet else ""
    output = resolve_output(args.out, run.folder("samples") / f"{control}{plan.tag()}.png")
    x = draw_samples(run, plan, batch_size=args.batch_size, progress=not args.no_progress)
    if args.npz:  # the raw samples first: a picture that cannot be written loses nothing
        print(f"wrote {write_raw(x, output)} (samples: {tuple(x.shape)}, values in the data's scale)")
    files = save_samples(run, x, output, title=plan.describe(), nrow=plan.per_prompt)  # a text run: a row per prompt
    if run.is_audio:  # sound: its picture and a WAV per sample
        print(f"wrote {files[0]} and {len(files) - 1} WAV files (000000.wav ...) in {files[-1].parent}")
        return 0
    print(f"wrote {output.picture}" + (f" and {len(x)} PNG files (000000.png ...) beside it" if output.is_folder
                                       else ""))
    return 0


def _image_run(args, command: str) -> Run:
    if args.n < 1:
        raise DDPMError(f"--n must be at least 1, got {args.n}")
    run = load_run(args.run_dir, args.weights, resolve_device(args.device))
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
    request = InpaintRequest(args.steps, args.step_schedule, args.variance, args.jump_length, args.jump_n_sample,
                             args.label, args.guidance, args.seed, args.n)
    run = _image_run(args, "inpaint")
    if listed_classes(args, run):
        return 0
    plan = plan_inpainting(run, request)
    image = load_picture(args.image, run.image_shape, args.resize)
    mask = load_mask(args.mask, run.image_shape[1:], args.resize)
    default = run.folder("samples") / f"inpaint_{Path(args.image).stem}_seed{args.seed}{plan.condition_tag()}.png"
    output = resolve_output(args.out, default)  # before sampling: a bad --out costs nothing
    x = draw_inpainting(run, plan, image, mask, batch_size=args.batch_size, progress=not args.no_progress)
    path = _write_row(run, comparison_row(image, x, mask), x, output)
    print(f"wrote {path} (input, mask, {args.n} inpaintings)")
    return 0


def cmd_img2img(args) -> int:
    request = sampling_request(args)
    request.check()
    run = _image_run(args, "img2img")
    if listed_classes(args, run):
        return 0
    plan, t0 = plan_img2img(run, request, args.strength)
    image = load_picture(args.image, run.image_shape, args.resize)
    default = (run.folder("samples") / f"img2img_{Path(args.image).stem}_strength{args.strength:g}_"
               f"seed{args.seed}{plan.condition_tag()}.png")
    output = resolve_output(args.out, default)  # before sampling: a bad --out costs nothing
    x = edit_img2img(run, plan, image, args.strength, batch_size=args.batch_size, progress=not args.no_progress)
    path = _write_row(run, comparison_row(image, x), x, output)
    print(f"wrote {path} (input, {args.n} results; noised to t0 = {t0} of {run.T}, "
          f"{min(plan.steps, t0)} {plan.sampler} steps back)")
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
        with open_image(path) as img:  # raster formats only, nothing decoded
            return img.size
    except (OSError, ValueError):
        return None


def _low_res_picture(args, run: Run) -> torch.Tensor:
    """The picture of --image as (1, C, h, w) at the run's data.low_res size, refused at another size."""
    if run.cfg.model.condition != "low_res":
        raise DDPMError(f"ddpm upscale needs a super-resolution run (trained with model.condition=low_res); "
                        f"{args.run_dir} is not one: sample it with `ddpm sample {args.run_dir}`")
    c, h, w = run.shape
    lh, lw = run.cfg.data.low_res
    size = _picture_size(args.image)
    if size is not None and size != (lw, lh):
        raise DDPMError(f"--image '{args.image}' is {size[0]}x{size[1]} pixels but {args.run_dir} upscales "
                        f"{lw}x{lh} pictures (data.low_res, width x height) to {w}x{h}; give a {lw}x{lh} picture")
    return load_picture(args.image, (c, lh, lw))[None]


def cmd_upscale(args) -> int:
    """Super-resolution: the run's upscales of a low-res picture (SR3 sampling, Saharia et al. 2021)."""
    request = sampling_request(args)
    request.check()
    run = load_run(args.run_dir, args.weights, resolve_device(args.device))
    if listed_classes(args, run):
        return 0
    low = _low_res_picture(args, run)
    (_, h, w), (lh, lw) = run.shape, run.cfg.data.low_res
    plan = plan_request(run, sampling_request(args, cond=condition_from_low_res(low, run.cfg, (h, w))))
    default = run.folder("samples") / f"upscale_{Path(args.image).stem}_{plan.tag()}.png"
    output = resolve_output(args.out, default)  # before sampling: a bad --out costs nothing
    x = draw_samples(run, plan, batch_size=args.batch_size, progress=not args.no_progress)
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
