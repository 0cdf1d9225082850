"""What the demo's ControlNet tab does, without Gradio: ``ddpm sample BASE --controlnet CN --control picture.png``.

The control picture is an uploaded file or the sketchpad's drawing (white strokes on black, written as a PNG into
the request's folder first), read exactly as ``--control`` reads a file (:func:`~ddpmlab.data.control.read_control`:
a picture of another size is scaled and center-cropped to the ControlNet's, with a note); the base run the page
has loaded is steered by the ControlNet (:func:`~ddpmlab.runs.control.steer`, loaded once per run) and sampled
as the Sample tab samples it.  So the same control, settings and seed give the pixels the command line writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
from PIL import Image

from ddpmlab.data.control import read_control
from ddpmlab.demo.actions import SampleResult, draw_request
from ddpmlab.demo.serving import Limits, Runs, as_float
from ddpmlab.errors import DDPMError
from ddpmlab.io.images import save_images
from ddpmlab.runs.control import steer

SKETCH_SIZE = 256  # the sketchpad's canvas (pixels a side)


@dataclass
class ControlResult:
    sample: SampleResult  # the samples, as the Sample tab's
    control: Path  # the control as the ControlNet reads it (its size and channels), a PNG
    picture: Path  # the picture it was read from: the upload, or the drawing written as a PNG


def controlnet_choices(runs: Runs, run_dir) -> List[str]:
    """The ControlNet runs the page offers for the base ``run_dir`` ([] when it has none)."""
    return runs.controlnets(run_dir)


def sketch_picture(sketch, folder: Path) -> Optional[Path]:
    """The sketchpad's value (a dict with its ``composite``, or an array (H, W[, 3 or 4]) uint8) as
    folder/control.png, RGB over black (transparent pixels black); None when nothing is drawn (all black)."""
    arr = sketch.get("composite") if isinstance(sketch, dict) else sketch
    if arr is None:
        return None
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise DDPMError(f"the drawing has shape {arr.shape}; the sketchpad gives (H, W, 3 or 4) pixels")
    rgb = arr[:, :, :3].astype(np.float64) if arr.shape[2] >= 3 else np.repeat(arr, 3, axis=2).astype(np.float64)
    if arr.shape[2] == 4:  # over black: a transparent canvas is no stroke
        rgb *= arr[:, :, 3:4] / 255.0
    rgb = np.rint(rgb).clip(0, 255).astype(np.uint8)
    if not rgb.any():
        return None
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "control.png"
    Image.fromarray(rgb).save(path)
    return path


def control_sample(runs: Runs, run_dir, controlnet: Optional[str], *, control=None, sketch=None, scale=1.0,
                   sampler: Optional[str] = None, steps=None, step_schedule: Optional[str] = None, seed=0, n=4,
                   label=None, guidance=None, prompt=None, negative_prompt=None, weights: str = "ema",
                   limits: Limits = Limits(),
                   progress: Optional[Callable[[float, str], None]] = None) -> ControlResult:
    """``ddpm sample RUN --controlnet CONTROLNET --control PICTURE --control-scale SCALE [the Sample tab's options]
    --out FOLDER/ --npz``; PICTURE is ``control`` (a file) if given, else the ``sketch`` written as a PNG."""
    run = runs.get(run_dir, weights)
    if not controlnet:
        choices = runs.controlnets(str(run.dir))
        raise DDPMError("no ControlNet chosen: pick one of " + ", ".join(choices) if choices else
                        f"the run {run.dir} has no ControlNet here; train one with `ddpm train-controlnet {run.dir}` "
                        "and serve it beside the run (ddpm demo RUN CN_RUN)")
    scale = as_float(scale, "control scale")
    scale = 1.0 if scale is None else scale
    net = runs.controlnet(run, str(controlnet))
    folder = runs.new_folder("control")
    picture = Path(control) if control else sketch_picture(sketch, folder)
    if picture is None:
        raise DDPMError("no control picture: draw on the sketchpad (white on black) or upload a picture")
    notes: List[str] = []
    image = read_control(picture, net.control_shape(run.shape), notes.append)
    read = save_images(image * 2 - 1, folder / "read")[0]
    res = draw_request(runs, steer(run, [(net, image, scale)]), "sample", sampler=sampler, steps=steps,
                       step_schedule=step_schedule, seed=seed, n=n, label=label, guidance=guidance, prompt=prompt,
                       negative_prompt=negative_prompt, limits=limits, progress=progress)
    source = "the uploaded picture" if control else "the drawing"
    res.text = (f"ControlNet {controlnet} at scale {scale:g} on {source}; " + res.text
                + "".join(f"; {note}" for note in notes))
    return ControlResult(res, read, picture)
