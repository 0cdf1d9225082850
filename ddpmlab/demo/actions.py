"""What each tab of the demo page does, without Gradio: the same run-layer calls as the ``ddpm`` commands.

Every function here takes plain values (what the page's fields hold), checks them against the
page's :class:`Limits`, makes the :mod:`ddpmlab.runs` requests that ``ddpm sample`` / ``inpaint``
/ ``img2img`` / ``viz reverse`` make (same defaults: as the run samples where a field is empty;
same batch sizes, same seeds), and writes its pictures into a fresh folder below ``out_root``.
So the page shows the pixels the command line writes for the same settings.  Bad input raises
:class:`~ddpmlab.errors.DDPMError` with a one-line message (an OptionError is named by
:data:`NAMES`, the page's words for the library's options).
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ddpmlab.config import format_config
from ddpmlab.data import training_image as data_image
from ddpmlab.demo.serving import Limits, Runs, as_float, as_int, as_label, as_prompts, as_text
from ddpmlab.errors import DDPMError
from ddpmlab.io.images import comparison_row, load_mask, load_picture, save_grid, save_images
from ddpmlab.runs import (
    InpaintRequest,
    Output,
    Run,
    SamplingPlan,
    SamplingRequest,
    draw_inpainting,
    draw_samples,
    edit_img2img,
    grid_scale,
    plan_img2img,
    plan_inpainting,
    plan_request,
    resolve_output,
    write_raw,
)
from ddpmlab.viz import commands as viz
from ddpmlab.viz.plots import plot_loss
from ddpmlab.viz.samples import save_samples

# batch sizes of the commands the tabs mirror (ddpm sample / viz: 256, ddpm inpaint / img2img: 64):
# generate() seeds batch b with seed + b, so the same batch size gives the same pixels
SAMPLE_BATCH, EDIT_BATCH = 256, 64
# how the page names each option of the library, for its messages
NAMES = {"sampler": "sampler", "steps": "steps", "step_schedule": "step schedule", "class": "class",
         "guidance": "guidance scale", "weights": "weights", "n": "n", "strength": "SDEdit strength",
         "variance": "variance", "image": "image", "mask": "mask file", "resize": "the 'resize' box",
         "prompt": "prompt", "negative_prompt": "negative prompt"}
EDITOR_SIZE = 256  # the mask editor shows the image enlarged (nearest) to about this many pixels


def _request(run: Run, sampler: Optional[str], steps, step_schedule: Optional[str], n: int, label, guidance,
             seed: int, limits: Limits, prompts: Optional[List[str]] = None,
             negative: Optional[str] = None) -> SamplingRequest:
    """The request of a tab's fields (empty ones: as the run samples), within the page's limits; a text run's
    ``prompts`` get ``n`` samples each."""
    steps = as_int(steps, "steps")
    limits.check(n * len(prompts or [None]), steps, run=run)
    return SamplingRequest(sampler or None, steps, step_schedule or None, {}, label, guidance, seed, n,
                           prompts=prompts, negative_prompt=negative)


def _plan(run: Run, request: SamplingRequest, limits: Limits) -> SamplingPlan:
    plan = plan_request(run, request, log=lambda _msg: None)
    limits.check(plan.n, plan.steps, run=run)  # the sampler's default steps (ddpm: all T) count too
    return plan


def _condition(run: Run, label, guidance) -> Tuple[Optional[object], Optional[float]]:
    """The class and guidance fields: a class needs classes, guidance classes or text (a text run without
    classes refuses a class in the run layer, naming the prompt instead)."""
    label, guidance = as_label(label), as_float(guidance, "guidance scale")
    if (label is not None or guidance is not None) and not run.num_classes and not run.is_text:
        what = "a guidance scale" if guidance is not None else "a class"
        raise DDPMError(f"{what} needs a class-conditional run (trained with model.num_classes); "
                        f"{run.dir} is unconditional: leave class and guidance scale empty")
    return label, guidance


@dataclass
class SampleResult:
    picture: Path
    files: List[Path]
    npz: Path
    text: str
    steps: int = 0
    x: torch.Tensor = field(repr=False, default=None)


def sample(runs: Runs, run_dir, *, sampler: Optional[str] = None, steps=None, step_schedule: Optional[str] = None,
           seed=0, n=16, label=None, guidance=None, prompt=None, negative_prompt=None, weights: str = "ema",
           limits: Limits = Limits(), progress: Optional[Callable[[float, str], None]] = None) -> SampleResult:
    """``ddpm sample RUN [--sampler S --steps K --step-schedule TS] --seed X --n N [--class C --guidance G]
    [--prompt P ... --negative-prompt NP] --weights W --out FOLDER/ --npz``: FOLDER/grid.png (or the scatter
    plot; a text run's: a row per prompt), one PNG per image, samples.npz.  Empty sampler, steps and guidance:
    as the run samples (as ``ddpm sample RUN`` without them); ``prompt``: one a line, empty: the run's own."""
    return draw_request(runs, runs.get(run_dir, weights), "sample", sampler=sampler, steps=steps,
                        step_schedule=step_schedule, seed=seed, n=n, label=label, guidance=guidance, prompt=prompt,
                        negative_prompt=negative_prompt, limits=limits, progress=progress)


def draw_request(runs: Runs, run: Run, kind: str, *, sampler: Optional[str] = None, steps=None,
                 step_schedule: Optional[str] = None, seed=0, n=16, label=None, guidance=None, prompt=None,
                 negative_prompt=None, limits: Limits = Limits(),
                 progress: Optional[Callable[[float, str], None]] = None) -> SampleResult:
    """The Sample tab's request on the loaded ``run`` (steered by ControlNets or not), written as ``ddpm sample
    --out FOLDER/ --npz`` writes it into a fresh request folder of ``kind``."""
    n = as_int(n, "n", minimum=1)
    seed = as_int(seed, "seed") or 0
    label, guidance = _condition(run, label, guidance)
    prompts, negative = as_prompts(prompt), as_text(negative_prompt)
    plan = _plan(run, _request(run, sampler, steps, step_schedule, n, label, guidance, seed, limits, prompts,
                               negative), limits)
    output = resolve_output(str(runs.new_folder(kind)) + "/", Path("unused.png"))
    x = draw_samples(run, plan, batch_size=SAMPLE_BATCH, progress=False,
                     callback=_step_counter(plan, plan.n, progress, "sampling"))
    npz = write_raw(x, output)
    files = save_samples(run, x, output, title=plan.describe(), nrow=plan.per_prompt)
    guided = "" if plan.guidance is None else f", guidance {plan.guidance:g}"
    return SampleResult(output.picture, files[1:], npz, f"{plan.n} samples: {plan.describe()}{guided}, seed {seed} "
                        f"({run.weights} weights of {run.checkpoint}){_said_prompts(plan, prompts, negative)}",
                        plan.steps, x)


def _said_prompts(plan: SamplingPlan, asked: Optional[List[str]], negative: Optional[str]) -> str:
    """A text plan's prompts for the result line ('' for other runs): those asked for, or the run's own."""
    if not plan.prompts:
        return ""
    distinct = list(dict.fromkeys(plan.prompts))
    words = "; ".join(distinct)
    words = words if len(words) <= 200 else words[:197] + "..."
    whose = "prompts" if asked else "the run's own prompts"
    return f"; {whose}: {words}" + ("" if negative is None else f"; negative prompt: {negative}")


def _step_counter(plan: SamplingPlan, n: int, progress, desc: str):
    """A sampler callback that reports the fraction of steps done to ``progress(fraction, desc)``."""
    if progress is None:
        return None
    total = max(1, plan.spec.levels(plan.steps, **plan.options) * math.ceil(n / SAMPLE_BATCH))
    done = [0]

    def callback(*_):
        done[0] += 1
        progress(min(done[0] / total, 1.0), desc)

    return callback


def compare(runs: Runs, run_dir, a: Tuple[str, object], b: Tuple[str, object], *, seed=0, n=16,
            weights: str = "ema", limits: Limits = Limits(),
            progress: Optional[Callable[[float, str], None]] = None) -> List[Tuple[Path, str]]:
    """The same noise (seed) through two (sampler, steps) pairs: [(picture, caption with NFE and time)] * 2."""
    out = []
    for k, (sampler, steps) in enumerate((a, b)):
        t0 = time.perf_counter()
        res = sample(runs, run_dir, sampler=sampler, steps=steps, seed=seed, n=n, weights=weights, limits=limits,
                     progress=None if progress is None else (lambda f, d, k=k: progress((k + f) / 2, d)))
        nfe = res.steps  # one model evaluation per step (get_spec(sampler).levels counts noise levels)
        out.append((res.picture, f"{sampler}, {res.steps} steps: NFE {nfe}, {time.perf_counter() - t0:.1f} s"))
    return out


def reverse(runs: Runs, run_dir, *, sampler: Optional[str] = None, steps=None, seed=0, frames=10, n=None,
            weights: str = "ema", limits: Limits = Limits()) -> List[Path]:
    """``ddpm viz reverse RUN --n 1`` (images: a GIF and a strip of x_t and predicted x0) or
    ``ddpm viz toy RUN`` (2-D: the samples along the reverse process and an animation)."""
    run = runs.get(run_dir, weights)
    frames = as_int(frames, "snapshots", minimum=1)
    limits.check_frames(frames)
    n = as_int(n, "n", minimum=1) or (1 if run.is_image else min(2000, limits.samples_for(run)))
    seed = as_int(seed, "seed") or 0
    plan = _plan(run, _request(run, sampler, steps, None, n, None, None, seed, limits), limits)
    out = runs.new_folder("reverse")
    if run.is_image:
        gif, strip = viz.viz_reverse(run, plan, n, seed, frames, out)
        return [strip, gif]
    files = viz.viz_toy(run, plan, None, n, seed, frames, out)
    return [files[2], files[3]]


# ------------------------------------------------------------------------------ inpaint / img2img

def _image_run(runs: Runs, run_dir, weights: str, command: str) -> Run:
    run = runs.get(run_dir, weights)
    if not run.is_image:
        raise DDPMError(f"{command} works on image models; {run.dir} was trained on 2-D points")
    return run


def editor_scale(run: Run) -> int:
    """The nearest-neighbour enlargement of the model's images in the mask editor."""
    return max(1, EDITOR_SIZE // max(run.image_shape[1:]))


def training_image(runs: Runs, run_dir, index, weights: str = "ema") -> Path:
    """Training image ``index`` of the run's data as a PNG of the model's size (an input for editing)."""
    run = _image_run(runs, run_dir, weights, "inpainting")
    i = as_int(index, "training image", minimum=0) or 0
    return save_images(data_image(run.cfg, i)[None], runs.new_folder("input"))[0]  # decodes that one file


def read_input(runs: Runs, run_dir, path, resize: bool = False, weights: str = "ema") -> Tuple[Path, np.ndarray]:
    """An uploaded picture as the model's input (exactly as ``ddpm inpaint --image`` reads it):
    (PNG of the model's size, the same enlarged for the mask editor as uint8 RGB)."""
    run = _image_run(runs, run_dir, weights, "inpainting")
    if not path:
        raise DDPMError("no input image: upload a picture or pick a training image first")
    x = load_picture(path, run.image_shape, resize)
    png = save_images(x[None], runs.new_folder("input"))[0]
    return png, enlarged(png, editor_scale(run))


def enlarged(png, scale: int) -> np.ndarray:
    """A PNG as uint8 RGB (H*scale, W*scale, 3), nearest-neighbour enlarged (the editor's background)."""
    img = Image.open(png).convert("RGB")
    return np.array(img.resize((img.width * scale, img.height * scale), Image.NEAREST))


def mask_from_layers(layers: Sequence[np.ndarray], size: Tuple[int, int], scale: int) -> Optional[torch.Tensor]:
    """The brush strokes of the editor (RGBA layers of (H*scale, W*scale)) as a mask (1, H, W):
    1 (fill) where strokes cover more than half of a pixel's block, 0 (keep) elsewhere; None without strokes."""
    h, w = size
    painted = None
    for layer in layers or []:
        arr = np.asarray(layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        if arr.shape[:2] != (h * scale, w * scale):
            raise DDPMError(f"the drawn mask is {arr.shape[1]}x{arr.shape[0]} pixels but the editor's image is "
                            f"{w * scale}x{h * scale}; load the input image again, then draw")
        alpha = arr[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    cover = painted.reshape(h, scale, w, scale).mean(axis=(1, 3))
    mask = torch.from_numpy(cover > 0.5).float()[None]
    if not mask.any():
        raise DDPMError("the brush strokes cover no whole pixel of the model's image; draw a larger region")
    return mask


@dataclass
class EditResult:
    picture: Path
    files: List[Path]
    text: str
    mask: Optional[torch.Tensor] = None


def _write_row(run: Run, row: torch.Tensor, results: torch.Tensor, folder: Path) -> Tuple[Path, List[Path]]:
    """As ``ddpm inpaint/img2img --out FOLDER/``: FOLDER/grid.png (the row) and one PNG per result."""
    output = Output(folder, True)
    picture = save_grid(row, output.picture, nrow=len(row), scale=grid_scale(run.image_shape))
    return picture, save_images(results, output.path)


def inpaint_image(runs: Runs, run_dir, image_png, *, layers=None, mask_file=None, resize: bool = False, n=4,
                  steps=250, jump_length=10, jump_n_sample=10, seed=0, label=None, guidance=None,
                  weights: str = "ema", limits: Limits = Limits(), progress: bool = False) -> EditResult:
    """``ddpm inpaint RUN --image IMG --mask MASK --n N --steps K --jump-length J --jump-n-sample R --seed X``.

    The mask is ``mask_file`` if given (read as ``--mask``: white = fill), else the editor's strokes."""
    run = _image_run(runs, run_dir, weights, "inpainting")
    n = as_int(n, "n", minimum=1)
    steps, seed = as_int(steps, "RePaint steps", minimum=1) or 250, as_int(seed, "seed") or 0  # empty: as ddpm inpaint
    jump_length = as_int(jump_length, "jump length", minimum=1) or 10
    jump_n_sample = as_int(jump_n_sample, "jump n sample", minimum=1) or 10
    limits.check(n, steps, "inpaintings")
    limits.check_repaint(steps, jump_length, jump_n_sample)  # the jumps repeat steps: bounded alike
    label, guidance = _condition(run, label, guidance)
    plan = plan_inpainting(run, InpaintRequest(steps, None, None, jump_length,
                                               jump_n_sample, label, guidance, seed, n), log=lambda _msg: None)
    if not image_png:
        raise DDPMError("no input image: upload a picture or pick a training image first")
    image = load_picture(image_png, run.image_shape)
    if mask_file:
        mask = load_mask(mask_file, run.image_shape[1:], resize)
    else:
        mask = mask_from_layers(layers, run.image_shape[1:], editor_scale(run))
        if mask is None:
            raise DDPMError("no mask: paint the region to fill with the brush, or upload a mask file")
    x = draw_inpainting(run, plan, image, mask, batch_size=EDIT_BATCH, progress=progress)
    picture, files = _write_row(run, comparison_row(image, x, mask), x, runs.new_folder("inpaint"))
    return EditResult(picture, files, f"input, mask, {n} inpaintings (RePaint, {plan.options['steps']} steps, "
                                      f"jumps {jump_length} x {jump_n_sample}, seed {seed})", mask)


def img2img_image(runs: Runs, run_dir, image_png, *, strength=0.5, sampler: Optional[str] = None, steps=None, n=4,
                  seed=0, label=None, guidance=None, weights: str = "ema", limits: Limits = Limits(),
                  progress: bool = False) -> EditResult:
    """``ddpm img2img RUN --image IMG --strength S [--sampler SA --steps K] --n N --seed X``."""
    run = _image_run(runs, run_dir, weights, "img2img")
    n, seed = as_int(n, "n", minimum=1), as_int(seed, "seed") or 0
    strength = as_float(strength, "strength")
    strength = 0.5 if strength is None else strength
    label, guidance = _condition(run, label, guidance)
    request = _request(run, sampler, steps, None, n, label, guidance, seed, limits)
    plan, n0 = plan_img2img(run, request, strength, log=lambda _msg: None)
    limits.check(n, plan.steps, run=run)
    if not image_png:
        raise DDPMError("no input image: upload a picture or pick a training image first")
    image = load_picture(image_png, run.image_shape)
    x = edit_img2img(run, plan, image, strength, batch_size=EDIT_BATCH, progress=progress)
    picture, files = _write_row(run, comparison_row(image, x), x, runs.new_folder("img2img"))
    return EditResult(picture, files, f"input, {n} results (SDEdit, noised to t0 = {n0} of {run.T}, "
                                      f"{min(plan.steps, n0)} {plan.sampler} steps back, seed {seed})")


# ------------------------------------------------------------------------------ the run tab

ALL_CLASSES = "all classes in turn"


def class_choices(runs: Runs, run_dir, weights: str = "ema") -> List[Tuple[str, str]]:
    """The class field's choices as (shown, value): no class (the classes in turn), then each class as
    '3 cat' -> 'cat' (a run with names) or '3' -> '3'; [] for an unconditional run."""
    run = runs.get(run_dir, weights)
    if not run.num_classes:
        return []
    names = run.class_names or [str(i) for i in range(run.num_classes)]
    shown = [f"{i} {name}" if run.class_names else name for i, name in enumerate(names)]
    return [(ALL_CLASSES, "")] + list(zip(shown, names))


def prompt_fields(runs: Runs, run_dir, weights: str = "ema") -> Optional[Tuple[str, float]]:
    """A text run's prompt fields: (the prompt box's placeholder, its own prompts one a line; the guidance
    slider's start, the run's train.sample_guidance or 1, the conditional model); None for other runs."""
    run = runs.get(run_dir, weights)
    if not run.is_text:
        return None
    guidance = run.cfg.train.sample_guidance
    return "\n".join(run.prompts[:4]), 1.0 if guidance is None else float(guidance)


def latest_eval(run_dir) -> Dict[str, str]:
    """The last row of RUN/eval.csv ({} without one)."""
    path = Path(run_dir) / "eval.csv"
    if not path.is_file():
        return {}
    rows = [r for r in csv.DictReader(path.open()) if r.get("step")]
    return dict(rows[-1]) if rows else {}


def run_info(runs: Runs, run_dir, weights: str = "ema") -> Tuple[str, Optional[Path], str]:
    """(markdown summary with the loaded checkpoint and the latest eval metrics, loss-curve PNG or None,
    the resolved config as YAML)."""
    run = runs.get(run_dir, weights)
    kind = (f"images {'x'.join(map(str, run.shape))}" if run.is_image else "2-D points") + \
        (f", {run.num_classes} classes" if run.num_classes else ", unconditional")
    lines = [(f"**{run.dir}**: {run.cfg.model.kind} model on {run.cfg.data.dataset} ({kind}), T = {run.T}, "
              f"{run.cfg.diffusion.prediction} prediction"),
             f"loaded: {run.weights} weights of {run.checkpoint} on {run.device}"]
    if run.num_classes:
        lines.append(f"classes: {run.describe_classes()}")
    if run.is_text:
        lines.append(f"text-to-image (text.encoder {run.cfg.text.encoder}); its own prompts: "
                     f"{'; '.join(run.prompts) or 'none'}")
    ev = latest_eval(run.dir)
    if ev:
        lines.append("latest eval (eval.csv): " + ", ".join(f"{k} {v}" for k, v in ev.items()))
    else:
        lines.append("no eval.csv yet (train.eval_every, or `ddpm eval`)")
    try:
        loss = _loss_plot(runs, run.dir)
    except DDPMError as e:
        loss = None
        lines.append(str(e))
    return "\n\n".join(lines), loss, format_config(run.cfg)


def _loss_plot(runs: Runs, run_dir: str) -> Path:
    """The loss curve of RUN/log.csv, drawn again only when the log changed (not on every page load)."""
    log = Path(run_dir) / "log.csv"
    state = log.stat() if log.is_file() else None
    key = (run_dir, state and (state.st_mtime_ns, state.st_size))
    plot = runs.plots.get(key)
    if plot is None or not plot.is_file():
        plot = runs.plots[key] = plot_loss([run_dir], runs.new_folder("run") / "loss.png")
    return plot
