"""The Gradio page of ``ddpm demo``: tabs over :mod:`ddpmlab.demo.actions`, and nothing else.

Gradio is imported inside the functions, so ``import ddpmlab.demo`` works without it and only
serving says what to install.  Sampling runs one request at a time (a queue of bounded size,
concurrency 1); bad input is answered with a one-line ``gr.Error`` and the page keeps working.
"""

from __future__ import annotations

import functools
import inspect
import sys
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ddpmlab.demo.actions import (
    NAMES,
    class_choices,
    compare,
    enlarged,
    img2img_image,
    inpaint_image,
    prompt_fields,
    read_input,
    reverse,
    run_info,
    sample,
    training_image,
)
from ddpmlab.demo.actions import editor_scale as _editor_scale
from ddpmlab.demo.controlnet import SKETCH_SIZE, control_sample, controlnet_choices
from ddpmlab.demo.serving import KEEP_REQUESTS, Limits, Runs, host_warning
from ddpmlab.errors import DDPMError, OptionError
from ddpmlab.runs import resolve_device
from ddpmlab.samplers.registry import SAMPLER_SPECS, STEP_SCHEDULES

INSTALL_HINT = "pip install 'ddpmlab[demo]'"
DEFAULT_SCHEDULE = "sampler's default"
RUN_SAMPLER = "as the run samples"  # the sampler fields' first choice: the run's recommended or own sampler
RUN_STEPS = "steps (empty: the run's)"
DELETE_CACHE = (600, 3600)  # Gradio's copies of outputs and uploads: looked at every 10 minutes, kept an hour


def import_gradio():
    """The gradio module, or a one-line DDPMError saying how to install it."""
    try:
        import gradio as gr
    except ImportError:
        raise DDPMError(f"ddpm demo needs Gradio, which is not installed: {INSTALL_HINT}") from None
    return gr


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:500] or type(e).__name__


def _error(gr, message: str, traceback: bool = False):
    """gr.Error(message); the server log gets a traceback only for unexpected errors (Gradio >= 5.x knows
    print_exception, older releases always print)."""
    try:
        return gr.Error(message, print_exception=traceback)
    except TypeError:
        return gr.Error(message)


def _friendly(gr, fn):
    """Errors of a handler as one visible line (gr.Error): the library's own messages as they are,
    out-of-memory with what to change, anything else with its type."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except DDPMError as e:  # an option's error in the page's words for it
            raise _error(gr, _one_line(e.named(NAMES) if isinstance(e, OptionError) else e)) from None
        except torch.OutOfMemoryError:
            raise _error(gr, "out of memory: ask for fewer samples (n) or start ddpm demo with a smaller "
                             "--max-samples") from None
        except Exception as e:  # the page must keep serving whatever one request did
            raise _error(gr, f"{type(e).__name__}: {_one_line(e)}", traceback=True) from None

    return wrapper


def _schedule(name: Optional[str]) -> Optional[str]:
    return None if not name or name == DEFAULT_SCHEDULE else name


def _sampler(name: Optional[str]) -> Optional[str]:
    return None if not name or name == RUN_SAMPLER else name


def _sample_tab(gr, ui, samplers, schedules, limits: Limits) -> None:
    """Sampler, steps (empty: as the run samples), step schedule, seed, n, class and guidance; the grid."""
    with gr.Tab("Sample", id="sample"):
        with gr.Row():
            ui.s_sampler = gr.Dropdown(samplers, value=RUN_SAMPLER, label="sampler", elem_id="s-sampler")
            ui.s_steps = gr.Number(value=None, precision=0, label=RUN_STEPS, elem_id="s-steps")
            ui.s_sched = gr.Dropdown(schedules, value=DEFAULT_SCHEDULE, label="step schedule", elem_id="s-sched")
            ui.s_seed = gr.Number(value=0, precision=0, label="seed", elem_id="s-seed")
            ui.s_n = gr.Number(value=16, precision=0, label=f"n (at most {limits.max_samples})", elem_id="s-n")
        with gr.Row():
            ui.s_class = _class_field(gr, "s-class")
            ui.s_guid = gr.Number(value=None, label="guidance scale (empty: the run's)", visible=False,
                                  elem_id="s-guidance")
        with gr.Row():  # a text run's: shown when one is chosen (Handlers.run)
            ui.s_prompt = gr.Textbox(label="prompt (one a line, n samples each; empty: the run's own)", lines=2,
                                     visible=False, elem_id="s-prompt", scale=3)
            ui.s_negative = gr.Textbox(label="negative prompt (empty: the empty prompt)", visible=False,
                                       elem_id="s-negative", scale=2)
            ui.s_tguid = gr.Slider(0, 20, value=1.0, step=0.5, label="guidance scale (1: the prompt alone)",
                                   visible=False, elem_id="s-text-guidance", scale=2)
        ui.s_go = gr.Button("Sample", variant="primary", elem_id="s-go")
        ui.s_text = gr.Markdown(elem_id="s-text")
        ui.s_img = gr.Image(type="filepath", label="samples", interactive=False, height=320, elem_id="s-grid")
        ui.s_files = gr.File(label="downloads: one PNG per sample, samples.npz", file_count="multiple",
                             interactive=False, elem_id="s-files")


def _class_field(gr, elem_id: Optional[str] = None):
    """A class picker: the run's classes by name (filled when a run is chosen), or a name or index typed in."""
    return gr.Dropdown([], value=None, label="class", visible=False, allow_custom_value=True, elem_id=elem_id)


def _reverse_tab(gr, ui, samplers) -> None:
    with gr.Tab("Reverse process", id="reverse"):
        with gr.Row():
            ui.r_sampler = gr.Dropdown(samplers, value=RUN_SAMPLER, label="sampler")
            ui.r_steps = gr.Number(value=None, precision=0, label=RUN_STEPS)
            ui.r_seed = gr.Number(value=0, precision=0, label="seed")
            ui.r_frames = gr.Number(value=10, precision=0, label="snapshots")
        ui.r_go = gr.Button("Run the reverse process", variant="primary", elem_id="r-go")
        with gr.Row():
            ui.r_strip = gr.Image(type="filepath", label="x_t and predicted x0 (stills)", interactive=False,
                                  elem_id="r-strip")
            ui.r_gif = gr.Image(type="filepath", label="animation", interactive=False, elem_id="r-gif")


def _edit_tab(gr, ui, samplers) -> None:
    """The input (upload or a training image), the mask editor, RePaint's and SDEdit's settings, the row."""
    with gr.Tab("Inpaint / img2img", id="edit"):
        with gr.Row():
            ui.e_upload = gr.File(label="upload an image", file_count="single", elem_id="e-upload")
            with gr.Column():
                ui.e_index = gr.Number(value=0, precision=0, label="training image", elem_id="e-index")
                ui.e_pick = gr.Button("use this training image", elem_id="e-pick")
                ui.e_resize = gr.Checkbox(label="resize: scale and center-crop to the model's size", elem_id="e-resize")
        ui.e_input = gr.State(None)  # the input as a PNG of the model's size
        with gr.Row():
            ui.e_editor = gr.ImageEditor(label="paint the region to fill (RePaint)", type="numpy", image_mode="RGBA",
                                         sources=(), transforms=(), layers=False,
                                         brush=gr.Brush(default_size=40, colors=["#ff2020"], color_mode="fixed"),
                                         canvas_size=(256, 256), elem_id="e-editor")
            ui.e_mask = gr.File(label="or upload a mask (white = fill, black = keep)", file_count="single",
                                elem_id="e-mask")
        with gr.Row():
            ui.e_n = gr.Number(value=4, precision=0, label="n", elem_id="e-n")
            ui.e_seed = gr.Number(value=0, precision=0, label="seed")
            ui.e_class = _class_field(gr)
            ui.e_guid = gr.Number(value=None, label="guidance scale", visible=False)
        with gr.Row():
            ui.e_steps = gr.Number(value=50, precision=0, label="RePaint steps", elem_id="e-steps")
            ui.e_jump = gr.Number(value=10, precision=0, label="jump length")
            ui.e_jumps = gr.Number(value=2, precision=0, label="jump n sample (1 = no resampling)")
            ui.e_inpaint = gr.Button("Inpaint (RePaint)", variant="primary", elem_id="e-inpaint")
        with gr.Row():
            ui.e_strength = gr.Slider(0, 1, value=0.5, step=0.01, label="SDEdit strength")
            ui.e_sampler = gr.Dropdown(samplers, value=RUN_SAMPLER, label="sampler")
            ui.e_ssteps = gr.Number(value=None, precision=0, label=RUN_STEPS)
            ui.e_img2img = gr.Button("img2img (SDEdit)", variant="primary", elem_id="e-img2img")
        ui.e_text = gr.Markdown(elem_id="e-text")
        ui.e_row = gr.Image(type="filepath", label="input, mask, results", interactive=False, height=200,
                            elem_id="e-row")
        ui.e_files = gr.File(label="downloads", file_count="multiple", interactive=False)


def _controlnet_tab(gr, ui, samplers, limits: Limits) -> None:
    """A ControlNet of the run, a control picture (drawn: white on black, or uploaded), its scale; the grid."""
    with gr.Tab("ControlNet", id="controlnet"):
        with gr.Row():
            ui.k_net = gr.Dropdown([], value=None, label="ControlNet (trained on this run)", elem_id="k-net", scale=3)
            ui.k_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="control scale", elem_id="k-scale")
        with gr.Row():
            black = np.zeros((SKETCH_SIZE, SKETCH_SIZE, 3), np.uint8)
            ui.k_sketch = gr.Sketchpad(value={"background": black, "layers": [], "composite": black},
                                       label="draw the control (white on black)", type="numpy", image_mode="RGB",
                                       brush=gr.Brush(default_size=12, colors=["#ffffff"], color_mode="fixed"),
                                       canvas_size=(SKETCH_SIZE, SKETCH_SIZE), transforms=(), layers=False,
                                       elem_id="k-sketch")
            ui.k_upload = gr.File(label="or upload a control picture (used instead of the drawing)",
                                  file_count="single", elem_id="k-upload")
        with gr.Row():
            ui.k_sampler = gr.Dropdown(samplers, value=RUN_SAMPLER, label="sampler")
            ui.k_steps = gr.Number(value=None, precision=0, label=RUN_STEPS, elem_id="k-steps")
            ui.k_seed = gr.Number(value=0, precision=0, label="seed", elem_id="k-seed")
            ui.k_n = gr.Number(value=4, precision=0, label=f"n (at most {limits.max_samples})", elem_id="k-n")
            ui.k_class = _class_field(gr, "k-class")
            ui.k_guid = gr.Number(value=None, label="guidance scale (empty: the run's; 0: the control alone)",
                                  visible=False, elem_id="k-guidance")
        ui.k_prompt = gr.Textbox(label="prompt (one a line, n samples each; empty: the run's own)", lines=2,
                                 visible=False, elem_id="k-prompt")
        ui.k_go = gr.Button("Sample with the ControlNet", variant="primary", elem_id="k-go")
        ui.k_text = gr.Markdown(elem_id="k-text")
        with gr.Row():
            ui.k_read = gr.Image(type="numpy", label="the control, as the ControlNet reads it", height=160)
            ui.k_img = gr.Image(type="filepath", label="samples", interactive=False, height=320, elem_id="k-grid")
        ui.k_files = gr.File(label="downloads: one PNG per sample, samples.npz", file_count="multiple",
                             interactive=False, elem_id="k-files")


def _compare_and_run_tabs(gr, ui, samplers) -> None:
    with gr.Tab("Compare samplers", id="compare"):
        with gr.Row():
            ui.c_a = gr.Dropdown(samplers, value="ddim", label="sampler A")
            ui.c_a_steps = gr.Number(value=10, precision=0, label="steps A")
            ui.c_b = gr.Dropdown(samplers, value="dpmpp_2m", label="sampler B")
            ui.c_b_steps = gr.Number(value=10, precision=0, label="steps B")
            ui.c_seed = gr.Number(value=0, precision=0, label="seed (the same noise for both)")
            ui.c_n = gr.Number(value=16, precision=0, label="n")
        ui.c_go = gr.Button("Compare", variant="primary", elem_id="c-go")
        with gr.Row():
            ui.c_img_a = gr.Image(type="filepath", label="A", interactive=False, elem_id="c-a")
            ui.c_img_b = gr.Image(type="filepath", label="B", interactive=False, elem_id="c-b")
    with gr.Tab("Run", id="run-tab"):
        ui.i_text = gr.Markdown(elem_id="i-text")
        ui.i_loss = gr.Image(type="filepath", label="training loss (log.csv)", interactive=False)
        ui.i_config = gr.Code(label="config.yaml (resolved)", language="yaml", interactive=False)


def build_app(runs: Runs, limits: Limits = Limits()):
    """The page (a gr.Blocks, not yet launched) serving ``runs`` within ``limits``."""
    gr = import_gradio()
    samplers = list(SAMPLER_SPECS)
    ui = SimpleNamespace()
    with gr.Blocks(title="ddpmlab demo", delete_cache=DELETE_CACHE) as app:
        gr.Markdown("## ddpmlab demo\nSample, inspect and edit with trained DDPM runs. Every tab makes the same "
                    "library calls as the `ddpm` command line, so the same settings and seed give the same pixels; "
                    "empty settings sample as the run does.")
        with gr.Row():
            ui.run = gr.Dropdown(runs.dirs, value=runs.dirs[0], label="run", elem_id="run", scale=3)
            ui.weights = gr.Radio(["ema", "model"], value="ema", label="weights (EMA or raw)", elem_id="weights")
        _sample_tab(gr, ui, [RUN_SAMPLER, *samplers], [DEFAULT_SCHEDULE, *STEP_SCHEDULES], limits)
        _reverse_tab(gr, ui, [RUN_SAMPLER, *samplers])
        _edit_tab(gr, ui, [RUN_SAMPLER, *samplers])
        _controlnet_tab(gr, ui, [RUN_SAMPLER, *samplers], limits)
        _compare_and_run_tabs(gr, ui, samplers)
        _connect(gr, app, ui, Handlers(gr, runs, limits))
    return app


class Handlers:
    """What each button does: the tab's action with the page's fields, its results as the page shows them."""

    def __init__(self, gr, runs: Runs, limits: Limits):
        self.gr, self.runs, self.limits = gr, runs, limits

    def sample(self, run_dir, w, sampler, steps, sched, seed, n, label, guidance, prompt=None, negative=None,
               text_guidance=None, progress=None):
        """The Sample tab; a text run's guidance is its slider's, other runs' the guidance field's."""
        if prompt_fields(self.runs, run_dir, w) is not None:
            guidance = text_guidance
        res = sample(self.runs, run_dir, sampler=_sampler(sampler), steps=steps,
                     step_schedule=_schedule(sched), seed=seed, n=n, label=label, guidance=guidance, prompt=prompt,
                     negative_prompt=negative, weights=w, limits=self.limits, progress=_reporter(progress))
        return res.text, str(res.picture), [str(p) for p in [*res.files, res.npz]]

    def controlnet(self, run_dir, w, net, scale, sketch, upload, sampler, steps, seed, n, label, guidance,
                   prompt=None, progress=None):
        """The ControlNet tab: the upload if there is one, else the drawing; the control shown enlarged."""
        res = control_sample(self.runs, run_dir, net, control=upload or None, sketch=sketch, scale=scale,
                             sampler=_sampler(sampler), steps=steps, seed=seed, n=n, label=label,
                             guidance=guidance, prompt=prompt, weights=w, limits=self.limits,
                             progress=_reporter(progress))
        s, size = res.sample, max(self.runs.get(run_dir, w).image_shape[1:])
        shown = enlarged(res.control, max(1, SKETCH_SIZE // 2 // size))
        return s.text, shown, str(s.picture), [str(p) for p in [*s.files, s.npz]]

    def reverse(self, run_dir, w, sampler, steps, seed, frames, progress=None):
        strip, gif = reverse(self.runs, run_dir, sampler=_sampler(sampler), steps=steps, seed=seed,
                             frames=frames, weights=w, limits=self.limits)
        return str(strip), str(gif)

    def editor_value(self, png, run_dir, w):
        arr = enlarged(png, _editor_scale(self.runs.get(run_dir, w)))
        return {"background": arr, "layers": [], "composite": arr}

    def pick(self, run_dir, w, index, _resize):
        png = training_image(self.runs, run_dir, index, w)
        return self.editor_value(png, run_dir, w), str(png)

    def upload(self, run_dir, w, path, resize):
        if not path:
            return self.gr.update(), None
        png, arr = read_input(self.runs, run_dir, path, bool(resize), w)
        return {"background": arr, "layers": [], "composite": arr}, str(png)

    def inpaint(self, run_dir, w, image_png, editor, mask_file, resize, n, seed, label, guidance, steps, jump, jumps,
                progress=None):
        layers = (editor or {}).get("layers") or []
        res = inpaint_image(self.runs, run_dir, image_png, layers=layers, mask_file=mask_file, resize=bool(resize),
                            n=n, steps=steps, jump_length=jump, jump_n_sample=jumps, seed=seed, label=label,
                            guidance=guidance, weights=w, limits=self.limits, progress=True)
        return res.text, str(res.picture), [str(p) for p in res.files]

    def img2img(self, run_dir, w, image_png, strength, sampler, steps, n, seed, label, guidance, progress=None):
        res = img2img_image(self.runs, run_dir, image_png, strength=strength, sampler=_sampler(sampler),
                            steps=steps, n=n, seed=seed, label=label, guidance=guidance, weights=w,
                            limits=self.limits, progress=True)
        return res.text, str(res.picture), [str(p) for p in res.files]

    def compare(self, run_dir, w, a, a_steps, b, b_steps, seed, n, progress=None):
        (pa, ca), (pb, cb) = compare(self.runs, run_dir, (a, a_steps), (b, b_steps), seed=seed, n=n, weights=w,
                                     limits=self.limits, progress=_reporter(progress))
        return self.gr.update(value=str(pa), label=f"A: {ca}"), self.gr.update(value=str(pb), label=f"B: {cb}")

    def run(self, run_dir, w):
        """The run tab, the class fields (shown with the run's classes for a conditional run) and the prompt
        fields (shown for a text run, its guidance a slider starting at the run's scale)."""
        text, loss, config = run_info(self.runs, run_dir, w)
        choices = class_choices(self.runs, run_dir, w)
        fields = prompt_fields(self.runs, run_dir, w)
        classes = [self.gr.update(visible=bool(choices), value=None, choices=choices) for _ in range(2)]
        guidance = [self.gr.update(visible=bool(choices) and fields is None, value=None),
                    self.gr.update(visible=bool(choices), value=None)]
        shown = fields is not None
        prompts = [self.gr.update(visible=shown, value="", placeholder=fields[0] if shown else None),
                   self.gr.update(visible=shown, value=""),
                   self.gr.update(visible=shown, value=fields[1] if shown else 1.0)]
        nets = controlnet_choices(self.runs, run_dir)
        control = [self.gr.update(choices=nets, value=nets[0] if nets else None),
                   self.gr.update(visible=bool(choices), value=None, choices=choices),
                   self.gr.update(visible=bool(choices) or shown, value=None),
                   self.gr.update(visible=shown, value="", placeholder=fields[0] if shown else None)]
        return (text, None if loss is None else str(loss), config, classes[0], guidance[0], classes[1], guidance[1],
                None, None, *control, *prompts)


def _reporter(progress):
    """progress(fraction, desc) for an action, from a gr.Progress (None without one)."""
    return None if progress is None else (lambda f, desc: progress(f, desc=desc))


def _tracked(gr, fn, track_tqdm: bool = False):
    """``fn`` with a gr.Progress as the default of its last parameter (``progress``), where Gradio looks for it."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    params[-1] = params[-1].replace(default=gr.Progress(track_tqdm=track_tqdm))

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        return fn(*args, **kwargs)

    handler.__signature__ = sig.replace(parameters=params)
    return handler


def _connect(gr, app, ui, h: Handlers) -> None:
    """Each button to its handler (errors as one visible line, sampling one request at a time)."""
    f = functools.partial(_friendly, gr)
    tracked = functools.partial(_tracked, gr, track_tqdm=True)
    base = [ui.run, ui.weights]
    ui.s_go.click(f(_tracked(gr, h.sample)),
                  base + [ui.s_sampler, ui.s_steps, ui.s_sched, ui.s_seed, ui.s_n, ui.s_class, ui.s_guid,
                          ui.s_prompt, ui.s_negative, ui.s_tguid],
                  [ui.s_text, ui.s_img, ui.s_files], concurrency_id="sampling", api_name="sample")
    ui.r_go.click(f(tracked(h.reverse)), base + [ui.r_sampler, ui.r_steps, ui.r_seed, ui.r_frames],
                  [ui.r_strip, ui.r_gif], concurrency_id="sampling", api_name="reverse")
    ui.e_pick.click(f(h.pick), base + [ui.e_index, ui.e_resize], [ui.e_editor, ui.e_input], api_name="training_image")
    ui.e_upload.upload(f(h.upload), base + [ui.e_upload, ui.e_resize], [ui.e_editor, ui.e_input], api_name="upload")
    ui.e_inpaint.click(f(tracked(h.inpaint)),
                       base + [ui.e_input, ui.e_editor, ui.e_mask, ui.e_resize, ui.e_n, ui.e_seed, ui.e_class,
                               ui.e_guid, ui.e_steps, ui.e_jump, ui.e_jumps],
                       [ui.e_text, ui.e_row, ui.e_files], concurrency_id="sampling", api_name="inpaint")
    ui.e_img2img.click(f(tracked(h.img2img)),
                       base + [ui.e_input, ui.e_strength, ui.e_sampler, ui.e_ssteps, ui.e_n, ui.e_seed, ui.e_class,
                               ui.e_guid], [ui.e_text, ui.e_row, ui.e_files],
                       concurrency_id="sampling", api_name="img2img")
    ui.k_go.click(f(_tracked(gr, h.controlnet)),
                  base + [ui.k_net, ui.k_scale, ui.k_sketch, ui.k_upload, ui.k_sampler, ui.k_steps, ui.k_seed, ui.k_n,
                          ui.k_class, ui.k_guid, ui.k_prompt],
                  [ui.k_text, ui.k_read, ui.k_img, ui.k_files], concurrency_id="sampling", api_name="controlnet")
    ui.c_go.click(f(_tracked(gr, h.compare)), base + [ui.c_a, ui.c_a_steps, ui.c_b, ui.c_b_steps, ui.c_seed, ui.c_n],
                  [ui.c_img_a, ui.c_img_b], concurrency_id="sampling", api_name="compare")
    run_outputs = [ui.i_text, ui.i_loss, ui.i_config, ui.s_class, ui.s_guid, ui.e_class, ui.e_guid, ui.e_editor,
                   ui.e_input, ui.k_net, ui.k_class, ui.k_guid, ui.k_prompt, ui.s_prompt, ui.s_negative, ui.s_tguid]
    steps = [ui.s_steps, ui.r_steps, ui.e_ssteps, ui.k_steps]  # Gradio shows a new empty number as 0: set it empty
    app.load(lambda: [None] * len(steps), None, steps, api_name=False)
    for trigger in (ui.run.change, ui.weights.change, app.load):
        trigger(f(h.run), base, run_outputs, concurrency_limit=4, concurrency_id="light", api_name=False)


UPLOAD_MB = 10  # the largest upload (ddpm demo --max-upload-mb)


def serve(run_dirs: Sequence, *, host: str = "127.0.0.1", port: int = 7860, max_samples: int = 256,
          max_steps: int = 1000, queue_size: int = 16, device="auto", out_root=None, block: bool = True,
          quiet: bool = False, auth: Optional[Tuple[str, str]] = None, max_upload_mb: int = UPLOAD_MB,
          keep_requests: int = KEEP_REQUESTS):
    """Serve the page for ``run_dirs`` at http://host:port/ and return the launched app.

    ``block=False`` returns at once with the server running in a thread (stop it with ``app.close()``).
    Requests wait in a queue of at most ``queue_size``; sampling runs one request at a time.  Pictures go
    to a fresh folder below ``out_root`` (the only folder served), the newest ``keep_requests`` requests'
    kept; uploads are at most ``max_upload_mb`` MB; ``auth`` = (user, password) asks for a login.
    """
    import_gradio()  # the install hint before anything is loaded
    for name, value in (("--max-samples", max_samples), ("--max-steps", max_steps), ("--queue-size", queue_size),
                        ("--max-upload-mb", max_upload_mb)):
        if value < 1:
            raise DDPMError(f"{name} must be at least 1, got {value}")
    if not 0 < port < 65536:
        raise DDPMError(f"--port must be between 1 and 65535, got {port}")
    runs = Runs(run_dirs, resolve_device(device), out_root, keep_requests)
    for d in runs.dirs:
        runs.get(d)  # a run that does not load fails before the server starts
    app = build_app(runs, Limits(max_samples, max_steps))
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    warning = host_warning(host, auth)
    if warning:
        print(warning, file=sys.stderr)
    try:
        app.launch(server_name=host, server_port=port, prevent_thread_lock=True, allowed_paths=[str(runs.out_root)],
                   quiet=quiet, show_error=True, inbrowser=False, auth=auth, max_file_size=max_upload_mb * 1024**2)
    except OSError as e:
        raise DDPMError(f"cannot serve on {host}:{port} ({_one_line(e)}); choose another --port") from None
    if block:
        print(f"ddpm demo: serving {len(runs.dirs)} run(s) at http://{host}:{port}/ (Ctrl-C stops); "
              f"pictures in {runs.out_root}")
        try:
            app.block_thread()
        finally:
            app.close()
    return app
