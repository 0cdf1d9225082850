"""The run layer: a trained run loaded once, and the one set of rules for sampling from it.

Every front end (the ``ddpm`` command, the demo, evaluation, pictures, benchmarks, training's
own sample grids) goes through here, so that they agree on:

* :mod:`.load` - the device, loading a run (config, weights, schedule, sample shape, class
  names) or a local diffusers folder, latent runs' autoencoder;
* :mod:`.classes` - class names stored with a run (RUN/classes.json), a class by name or index;
* :mod:`.request` - a :class:`SamplingRequest` (what a user asked for, by name) and
  :func:`plan_request`, the one function that turns it into a :class:`SamplingPlan` as the run
  says (its recommended or own sampler, steps and guidance, its variance, labels);
* :mod:`.prompts` - a text run's prompts: its own (RUN/samples/prompts.txt), a file of prompts,
  the text part of a plan (n samples per prompt, the unconditional branch of guidance);
* :mod:`.draw` - samples as a plan says; :mod:`.edit` - img2img and inpainting of a picture;
* :mod:`.output` - where the results go: the raw samples are written before any picture, and
  ``out`` may be a file or a folder.
"""

from ddpmlab.runs.classes import CLASSES_FILE, LIST, class_index, describe_classes, load_class_names, save_class_names
from ddpmlab.runs.draw import decode, draw_samples
from ddpmlab.runs.edit import (
    InpaintPlan,
    InpaintRequest,
    draw_inpainting,
    edit_img2img,
    edit_inpaint,
    plan_img2img,
    plan_inpainting,
)
from ddpmlab.runs.load import (
    DEVICE_KINDS,
    WEIGHTS,
    Run,
    check_latent_run,
    load_autoencoder,
    load_diffusers_run,
    load_run,
    resolve_device,
)
from ddpmlab.runs.output import Output, grid_scale, resolve_output, write_raw
from ddpmlab.runs.prompts import PROMPTS_FILE, load_run_prompts, read_prompts_file
from ddpmlab.runs.request import (
    RECOMMENDATION_FILE,
    SamplingPlan,
    SamplingRequest,
    check_steps,
    choose_sampler,
    condition_tag,
    default_sampler,
    own_sampler,
    plan_request,
    read_recommendation,
    recommended_sampler,
    run_guidance,
)

__all__ = [
    "CLASSES_FILE", "DEVICE_KINDS", "LIST", "PROMPTS_FILE", "RECOMMENDATION_FILE", "WEIGHTS", "InpaintPlan",
    "InpaintRequest", "Output",
    "Run",
    "SamplingPlan", "SamplingRequest", "check_latent_run", "check_steps", "choose_sampler", "class_index",
    "condition_tag", "decode", "default_sampler", "describe_classes", "draw_inpainting", "draw_samples",
    "edit_img2img", "edit_inpaint", "grid_scale", "load_autoencoder", "load_class_names", "load_diffusers_run",
    "load_run", "load_run_prompts", "own_sampler", "plan_img2img", "plan_inpainting", "plan_request",
    "read_prompts_file", "read_recommendation",
    "recommended_sampler", "resolve_device", "resolve_output", "run_guidance", "save_class_names", "write_raw",
]
