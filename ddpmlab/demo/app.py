"""The Gradio page of ``ddpm demo``: tabs over :mod:`ddpmlab.demo.actions`, and nothing else.

Gradio is imported inside the functions, so ``import ddpmlab.demo`` works without it and only
serving says what to install.  Sampling runs one request at a time (a queue of bounded size,
concurrency 1); bad input is answered with a one-line ``gr.Error`` and the page keeps working.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from ddpmlab.demo.actions import (
    Limits,
    Runs,
    compare,
    enlarged,
    img2img_image,
    inpaint_image,
    read_input,
    reverse,
    run_info,
    sample,
    training_image,
)
from ddpmlab.demo.actions import editor_scale as _editor_scale
from ddpmlab.errors import DDPMError
from ddpmlab.runs import resolve_device
from ddpmlab.samplers.registry import SAMPLER_SPECS, STEP_SCHEDULES

INSTALL_HINT = "pip install 'ddpmlab[demo]'"
DEFAULT_SCHEDULE = "sampler's default"


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
        except DDPMError as e:
            raise _error(gr, _one_line(e)) from None
        except torch.OutOfMemoryError:
            raise _error(gr, "out of memory: ask for fewer samples (n) or start ddpm demo with a smaller "
                             "--max-samples") from None
        except Exception as e:  # the page must keep serving whatever one request did
            raise _error(gr, f"{type(e).__name__}: {_one_line(e)}", traceback=True) from None

    return wrapper


def _schedule(name: Optional[str]) -> Optional[str]:
    return None if not name or name == DEFAULT_SCHEDULE else name


def build_app(runs: Runs, limits: Limits = Limits()):
    """The page (a gr.Blocks, not yet launched) serving ``runs`` within ``limits``."""
    gr = import_gradio()
    samplers = list(SAMPLER_SPECS)
    schedules = [DEFAULT_SCHEDULE, *STEP_SCHEDULES]

    def conditional(run_dir, weights):
        return runs.get(run_dir, weights).num_classes > 0

    with gr.Blocks(title="ddpmlab demo") as app:
        gr.Markdown("## ddpmlab demo\nSample, inspect and edit with trained DDPM runs. Every tab makes the same "
                    "library calls as the `ddpm` command line, so the same settings and seed give the same pixels.")
        with gr.Row():
            run = gr.Dropdown(runs.dirs, value=runs.dirs[0], label="run", elem_id="run", scale=3)
            weights = gr.Radio(["ema", "model"], value="ema", label="weights (EMA or raw)", elem_id="weights")

        with gr.Tab("Sample", id="sample"):
            with gr.Row():
                s_sampler = gr.Dropdown(samplers, value="ddim", label="sampler", elem_id="s-sampler")
                s_steps = gr.Number(value=50, precision=0, label="steps", elem_id="s-steps")
                s_sched = gr.Dropdown(schedules, value=DEFAULT_SCHEDULE, label="step schedule", elem_id="s-sched")
                s_seed = gr.Number(value=0, precision=0, label="seed", elem_id="s-seed")
                s_n = gr.Number(value=16, precision=0, label=f"n (at most {limits.max_samples})", elem_id="s-n")
            with gr.Row():
                s_class = gr.Number(value=None, precision=0, label="class", visible=False, elem_id="s-class")
                s_guid = gr.Number(value=None, label="guidance scale", visible=False, elem_id="s-guidance")
            s_go = gr.Button("Sample", variant="primary", elem_id="s-go")
            s_text = gr.Markdown(elem_id="s-text")
            s_img = gr.Image(type="filepath", label="samples", interactive=False, height=320, elem_id="s-grid")
            s_files = gr.File(label="downloads: one PNG per sample, samples.npz", file_count="multiple",
                              interactive=False, elem_id="s-files")

        with gr.Tab("Reverse process", id="reverse"):
            with gr.Row():
                r_sampler = gr.Dropdown(samplers, value="ddim", label="sampler")
                r_steps = gr.Number(value=50, precision=0, label="steps")
                r_seed = gr.Number(value=0, precision=0, label="seed")
                r_frames = gr.Number(value=10, precision=0, label="snapshots")
            r_go = gr.Button("Run the reverse process", variant="primary", elem_id="r-go")
            with gr.Row():
                r_strip = gr.Image(type="filepath", label="x_t and predicted x0 (stills)", interactive=False,
                                   elem_id="r-strip")
                r_gif = gr.Image(type="filepath", label="animation", interactive=False, elem_id="r-gif")

        with gr.Tab("Inpaint / img2img", id="edit"):
            with gr.Row():
                e_upload = gr.File(label="upload an image", file_count="single", elem_id="e-upload")
                with gr.Column():
                    e_index = gr.Number(value=0, precision=0, label="training image", elem_id="e-index")
                    e_pick = gr.Button("use this training image", elem_id="e-pick")
                    e_resize = gr.Checkbox(label="resize: scale and center-crop to the model's size",
                                           elem_id="e-resize")
            e_input = gr.State(None)  # the input as a PNG of the model's size
            with gr.Row():
                e_editor = gr.ImageEditor(label="paint the region to fill (RePaint)", type="numpy",
                                          image_mode="RGBA", sources=(), transforms=(), layers=False,
                                          brush=gr.Brush(default_size=40, colors=["#ff2020"], color_mode="fixed"),
                                          canvas_size=(256, 256), elem_id="e-editor")
                e_mask = gr.File(label="or upload a mask (white = fill, black = keep)", file_count="single",
                                 elem_id="e-mask")
            with gr.Row():
                e_n = gr.Number(value=4, precision=0, label="n", elem_id="e-n")
                e_seed = gr.Number(value=0, precision=0, label="seed")
                e_class = gr.Number(value=None, precision=0, label="class", visible=False)
                e_guid = gr.Number(value=None, label="guidance scale", visible=False)
            with gr.Row():
                e_steps = gr.Number(value=50, precision=0, label="RePaint steps", elem_id="e-steps")
                e_jump = gr.Number(value=10, precision=0, label="jump length")
                e_jumps = gr.Number(value=2, precision=0, label="jump n sample (1 = no resampling)")
                e_inpaint = gr.Button("Inpaint (RePaint)", variant="primary", elem_id="e-inpaint")
            with gr.Row():
                e_strength = gr.Slider(0, 1, value=0.5, step=0.01, label="SDEdit strength")
                e_sampler = gr.Dropdown(samplers, value="ddim", label="sampler")
                e_ssteps = gr.Number(value=50, precision=0, label="steps")
                e_img2img = gr.Button("img2img (SDEdit)", variant="primary", elem_id="e-img2img")
            e_text = gr.Markdown(elem_id="e-text")
            e_row = gr.Image(type="filepath", label="input, mask, results", interactive=False, height=200,
                             elem_id="e-row")
            e_files = gr.File(label="downloads", file_count="multiple", interactive=False)

        with gr.Tab("Compare samplers", id="compare"):
            with gr.Row():
                c_a = gr.Dropdown(samplers, value="ddim", label="sampler A")
                c_a_steps = gr.Number(value=10, precision=0, label="steps A")
                c_b = gr.Dropdown(samplers, value="dpmpp_2m", label="sampler B")
                c_b_steps = gr.Number(value=10, precision=0, label="steps B")
                c_seed = gr.Number(value=0, precision=0, label="seed (the same noise for both)")
                c_n = gr.Number(value=16, precision=0, label="n")
            c_go = gr.Button("Compare", variant="primary", elem_id="c-go")
            with gr.Row():
                c_img_a = gr.Image(type="filepath", label="A", interactive=False, elem_id="c-a")
                c_img_b = gr.Image(type="filepath", label="B", interactive=False, elem_id="c-b")

        with gr.Tab("Run", id="run-tab"):
            i_text = gr.Markdown(elem_id="i-text")
            i_loss = gr.Image(type="filepath", label="training loss (log.csv)", interactive=False)
            i_config = gr.Code(label="config.yaml (resolved)", language="yaml", interactive=False)

        # ------------------------------------------------------------------ handlers
        def do_sample(run_dir, w, sampler, steps, sched, seed, n, label, guidance, progress=gr.Progress()):
            res = sample(runs, run_dir, sampler=sampler, steps=steps, timesteps=_schedule(sched), seed=seed, n=n,
                         label=label, guidance=guidance, weights=w, limits=limits,
                         progress=lambda f, desc: progress(f, desc=desc))
            return res.text, str(res.picture), [str(p) for p in [*res.files, res.npz]]

        def do_reverse(run_dir, w, sampler, steps, seed, frames, progress=gr.Progress(track_tqdm=True)):
            strip, gif = reverse(runs, run_dir, sampler=sampler, steps=steps, seed=seed, frames=frames, weights=w,
                                 limits=limits)
            return str(strip), str(gif)

        def do_pick(run_dir, w, index, _resize):
            png = training_image(runs, run_dir, index, w)
            return _editor_value(png, run_dir, w), str(png)

        def do_upload(run_dir, w, path, resize):
            if not path:
                return gr.update(), None
            png, arr = read_input(runs, run_dir, path, bool(resize), w)
            return {"background": arr, "layers": [], "composite": arr}, str(png)

        def _editor_value(png, run_dir, w):
            arr = enlarged(png, _editor_scale(runs.get(run_dir, w)))
            return {"background": arr, "layers": [], "composite": arr}

        def do_inpaint(run_dir, w, image_png, editor, mask_file, resize, n, seed, label, guidance, steps, jump,
                       jumps, progress=gr.Progress(track_tqdm=True)):
            layers = (editor or {}).get("layers") or []
            res = inpaint_image(runs, run_dir, image_png, layers=layers, mask_file=mask_file, resize=bool(resize),
                                n=n, steps=steps, jump_length=jump, jump_n_sample=jumps, seed=seed, label=label,
                                guidance=guidance, weights=w, limits=limits, progress=True)
            return res.text, str(res.picture), [str(p) for p in res.files]

        def do_img2img(run_dir, w, image_png, strength, sampler, steps, n, seed, label, guidance,
                       progress=gr.Progress(track_tqdm=True)):
            res = img2img_image(runs, run_dir, image_png, strength=strength, sampler=sampler, steps=steps, n=n,
                                seed=seed, label=label, guidance=guidance, weights=w, limits=limits, progress=True)
            return res.text, str(res.picture), [str(p) for p in res.files]

        def do_compare(run_dir, w, a, a_steps, b, b_steps, seed, n, progress=gr.Progress()):
            (pa, ca), (pb, cb) = compare(runs, run_dir, (a, a_steps), (b, b_steps), seed=seed, n=n, weights=w,
                                         limits=limits, progress=lambda f, desc: progress(f, desc=desc))
            return gr.update(value=str(pa), label=f"A: {ca}"), gr.update(value=str(pb), label=f"B: {cb}")

        def do_run(run_dir, w):
            text, loss, config = run_info(runs, run_dir, w)
            cond = conditional(run_dir, w)
            hide = [gr.update(visible=cond, value=None) for _ in range(4)]
            return (text, None if loss is None else str(loss), config, *hide, None, None)

        f = functools.partial(_friendly, gr)
        base = [run, weights]
        s_go.click(f(do_sample), base + [s_sampler, s_steps, s_sched, s_seed, s_n, s_class, s_guid],
                   [s_text, s_img, s_files], concurrency_id="sampling", api_name="sample")
        r_go.click(f(do_reverse), base + [r_sampler, r_steps, r_seed, r_frames], [r_strip, r_gif],
                   concurrency_id="sampling", api_name="reverse")
        e_pick.click(f(do_pick), base + [e_index, e_resize], [e_editor, e_input], api_name="training_image")
        e_upload.upload(f(do_upload), base + [e_upload, e_resize], [e_editor, e_input], api_name="upload")
        e_inpaint.click(f(do_inpaint), base + [e_input, e_editor, e_mask, e_resize, e_n, e_seed, e_class, e_guid,
                                               e_steps, e_jump, e_jumps], [e_text, e_row, e_files],
                        concurrency_id="sampling", api_name="inpaint")
        e_img2img.click(f(do_img2img), base + [e_input, e_strength, e_sampler, e_ssteps, e_n, e_seed, e_class,
                                               e_guid], [e_text, e_row, e_files],
                        concurrency_id="sampling", api_name="img2img")
        c_go.click(f(do_compare), base + [c_a, c_a_steps, c_b, c_b_steps, c_seed, c_n], [c_img_a, c_img_b],
                   concurrency_id="sampling", api_name="compare")
        run_outputs = [i_text, i_loss, i_config, s_class, s_guid, e_class, e_guid, e_editor, e_input]
        for trigger in (run.change, weights.change, app.load):
            trigger(f(do_run), base, run_outputs, concurrency_limit=4, concurrency_id="light", api_name=False)
    return app


def serve(run_dirs: Sequence, *, host: str = "127.0.0.1", port: int = 7860, max_samples: int = 256,
          max_steps: int = 1000, queue_size: int = 16, device="auto", out_root=None, block: bool = True,
          quiet: bool = False):
    """Serve the page for ``run_dirs`` at http://host:port/ and return the launched app.

    ``block=False`` returns at once with the server running in a thread (stop it with ``app.close()``).
    Requests wait in a queue of at most ``queue_size``; sampling runs one request at a time.
    """
    import_gradio()  # the install hint before anything is loaded
    for name, value in (("--max-samples", max_samples), ("--max-steps", max_steps), ("--queue-size", queue_size)):
        if value < 1:
            raise DDPMError(f"{name} must be at least 1, got {value}")
    if not 0 < port < 65536:
        raise DDPMError(f"--port must be between 1 and 65535, got {port}")
    runs = Runs(run_dirs, resolve_device(device, "--device"), out_root)
    for d in runs.dirs:
        runs.get(d)  # a run that does not load fails before the server starts
    app = build_app(runs, Limits(max_samples, max_steps))
    app.queue(max_size=queue_size, default_concurrency_limit=1)
    try:
        app.launch(server_name=host, server_port=port, prevent_thread_lock=True, allowed_paths=[str(runs.out_root)],
                   quiet=quiet, show_error=True, inbrowser=False)
    except OSError as e:
        raise DDPMError(f"cannot serve on {host}:{port} ({_one_line(e)}); choose another --port") from None
    if block:
        print(f"ddpm demo: serving {len(runs.dirs)} run(s) at http://{host}:{port}/ (Ctrl-C stops)")
        try:
            app.block_thread()
        finally:
            app.close()
    return app
