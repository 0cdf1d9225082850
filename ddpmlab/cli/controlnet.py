"""``ddpm train-controlnet`` and the ControlNet options of ``ddpm sample`` and ``ddpm export``: parse, ask the
layers below, say what was written."""

from __future__ import annotations

import argparse

from ddpmlab.errors import DDPMError
from ddpmlab.io.diffusers_controlnet import export_controlnet, export_controlnet_pipeline, pipeline_refusal
from ddpmlab.runs import load_run
from ddpmlab.runs.control import load_controlnet
from ddpmlab.training.tasks.controlnet import train_controlnet


def controlnet_options(p: argparse.ArgumentParser) -> None:
    """--controlnet, --control, --control-scale (each repeatable): ControlNets steering the run's UNet."""
    p.add_argument("--controlnet", action="append", default=[], metavar="CN_RUN",
                   help="a ControlNet run (ddpm train-controlnet) steering the UNet; repeat for several, each with "
                        "its --control")
    p.add_argument("--control", action="append", default=[], metavar="PICTURE",
                   help="the control picture of each --controlnet (e.g. edges: white on black), in their order; "
                        "another size is scaled and center-cropped to the ControlNet's")
    p.add_argument("--control-scale", action="append", type=float, default=[], metavar="S",
                   help="the strength of each ControlNet's residuals (default 1; one value for all, or one each)")


def train_controlnet_parser(sub) -> None:
    c = sub.add_parser(
        "train-controlnet", help="train a ControlNet that steers a frozen UNet run by a control image",
        description="Train a ControlNet (Zhang et al. 2023) on BASE (a UNet run: unconditional, class-conditional or\n"
                    "text-to-image, on pixels or latents; a text run's captions are read as ddpm train reads them):\n"
                    "a trainable copy of its encoder half, joined to the frozen BASE by zero-initialised\n"
                    "convolutions, learns to follow control images: computed from the training images by\n"
                    "controlnet.detector (edges, mask, scribble, blur), or, with controlnet.detector=null, the\n"
                    "pictures of the same names in control/ beside data.path. A new run beside BASE with its own\n"
                    "config, checkpoints (the ControlNet alone), resume and EMA. Keys: train.*, data.* and\n"
                    "controlnet.* as key=value. Then: ddpm sample BASE --controlnet RUN --control picture.png\n"
                    "[--prompt ...]; ddpm export RUN OUT (a StableDiffusionControlNetPipeline where BASE maps)",
        epilog="Examples:\n  ddpm train-controlnet runs/mnist-... controlnet.detector=edges train.steps=1000\n"
               "  ddpm train-controlnet runs/mnist-... controlnet.detector=null data.dataset=folder "
               "data.path=pairs/images data.channels=1 data.image_size=28\n"
               "  ddpm train-controlnet --resume runs/mnist-...-controlnet-edges-...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("base", metavar="BASE", nargs="?", help="the run the ControlNet steers (its EMA weights, frozen)")
    c.add_argument("--resume", metavar="CN_RUN", help="continue this ControlNet run from its newest checkpoint")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. controlnet.detector=mask train.steps=1000")
    c.set_defaults(func=cmd_train_controlnet, parser=c)


def cmd_train_controlnet(args) -> int:
    """ddpm train-controlnet BASE [key=value ...], or --resume CN_RUN [key=value ...]."""
    if (args.base is None) == (args.resume is None):
        raise DDPMError("give either BASE (the UNet run the ControlNet steers) or --resume CN_RUN")
    train_controlnet(args.base, args.overrides, resume_dir=args.resume, progress=not args.no_progress)
    return 0


def export_controlnet_run(args, cfg) -> int:
    """``ddpm export CN_RUN OUT`` of a ControlNet run: a StableDiffusionControlNetPipeline folder with its base where
    the base exports as StableDiffusionPipeline, else a diffusers ControlNetModel folder where the ControlNet maps."""
    if args.merge or args.lora:
        raise DDPMError(f"{args.run_dir} is a ControlNet run; --merge and --lora belong to its base's export")
    net = load_controlnet(args.run_dir, args.weights)[1]
    why = pipeline_refusal(cfg, net)
    if why is None:
        base = load_run(cfg.controlnet.base, "ema", "cpu")
        out = export_controlnet_pipeline(cfg, net, base.model, base.codec, args.out, cfg.controlnet.base)
        print(f"wrote {out}: load it with diffusers.StableDiffusionControlNetPipeline.from_pretrained({str(out)!r}) "
              f"(the base {cfg.controlnet.base}'s EMA weights; the ControlNet alone: "
              f"ControlNetModel.from_pretrained({str(out / 'controlnet')!r}))")
        return 0
    out = export_controlnet(cfg, net, args.out)
    print(f"wrote {out}: load it with diffusers.ControlNetModel.from_pretrained({str(out)!r}), beside the base's "
          f"export (ddpm export {cfg.controlnet.base} ...); no StableDiffusionControlNetPipeline: {why}")
    return 0
