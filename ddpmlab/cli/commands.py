"""What the training, export and data ``ddpm`` subcommands do: read the arguments, call the library, say
what was written (the sampling commands: :mod:`.sampling`; eval, bench, viz: :mod:`.study`).

Every rule about runs and sampling lives in :mod:`ddpmlab.runs`.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import List, Sequence

import torch
from safetensors.torch import save_file

from ddpmlab.cli.controlnet import export_controlnet_run
from ddpmlab.config import Config, format_config, load_config
from ddpmlab.data.check import check_folder
from ddpmlab.demo import serve as serve_demo
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import load_run_config, require_run_dir
from ddpmlab.io.diffusers_bridge import export_diffusers
from ddpmlab.io.diffusers_text import export_text_run, text_pipeline
from ddpmlab.io.latent_export import export_latent_run
from ddpmlab.runs import load_autoencoder, load_run
from ddpmlab.training.posthoc_ema import reconstruct
from ddpmlab.training.run_folder import resume_config_from
from ddpmlab.training.tasks.autoencoder import train_autoencoder
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.tasks.distill import distill_run
from ddpmlab.training.tasks.finetune import finetune_run
from ddpmlab.training.tasks.reflow import reflow_run

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
        cfg = resume_config_from(run_dir, args.overrides, force=args.force, force_option="--force")
        if cfg.finetune.source:
            raise DDPMError(f"{run_dir} fine-tunes {cfg.finetune.source}; continue it with `ddpm finetune --resume "
                            f"{run_dir}`")
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
            "Start a new run with a smaller train.batch_size or model (unet.base_channels), or "
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


def cmd_reflow(args) -> int:
    """ddpm reflow RUN [--pairs N] [--steps S] [key=value ...], or --resume REFLOW_RUN [key=value ...]."""
    if (args.run_dir is None) == (args.resume is None):
        raise DDPMError("give either RUN (the teacher flow run to reflow) or --resume REFLOW_RUN")
    if args.resume and (args.pairs is not None or args.steps is not None):
        raise DDPMError("--resume continues a reflow with the pairs its config.yaml names; drop --pairs and --steps")
    reflow_run(args.run_dir, args.pairs, args.steps, args.overrides, resume_dir=args.resume,
               progress=not args.no_progress)
    return 0


def cmd_finetune(args) -> int:
    """ddpm finetune SRC [--method full|lora] [key=value ...], or --resume FINETUNE_RUN [key=value ...]."""
    if (args.source is None) == (args.resume is None):
        raise DDPMError("give either SRC (the run or diffusers folder to fine-tune) or --resume FINETUNE_RUN")
    if args.resume and args.method != "full":
        raise DDPMError("--resume continues a fine-tuning with the method its config.yaml names; drop --method")
    finetune_run(args.source, args.method, args.overrides, resume_dir=args.resume, progress=not args.no_progress)
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


# ------------------------------------------------------------------------------ ema, export, data, demo

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
    if cfg.controlnet.base:  # a ControlNet run: diffusers' ControlNetModel
        return export_controlnet_run(args, cfg)
    lora_run = cfg.finetune.method == "lora"
    if (lora_run or args.lora) and not args.merge:
        what = f"{args.run_dir} is a LoRA fine-tuning of {cfg.finetune.source}" if lora_run else "--lora adapters"
        raise DDPMError(f"{what}: diffusers' models hold no adapter; add --merge to bake the adapters into the weights")
    if args.merge and not (lora_run or args.lora):
        raise DDPMError(f"--merge bakes LoRA adapters in, but {args.run_dir} is no LoRA run and no --lora is given")
    if cfg.model.condition != "none":
        raise DDPMError(f"{args.run_dir} is a conditioned run (model.condition={cfg.model.condition}); diffusers' "
                        "DDPMPipeline has no low-res or spectrogram input, so it is not exported")
    if cfg.text.encoder:  # a text run: StableDiffusionPipeline or PixArtAlphaPipeline, or a one-line refusal
        pipeline = text_pipeline(cfg)
        out = export_text_run(args.run_dir, args.out, load_autoencoder(cfg.model.autoencoder, "cpu"), args.weights,
                              args.lora)
        print(f"wrote {out}: load it with diffusers.{pipeline}.from_pretrained({str(out)!r})")
        return 0
    if cfg.model.autoencoder:  # the denoiser with its autoencoder, as an LDMPipeline or DiTPipeline
        out = export_latent_run(args.run_dir, args.out, load_autoencoder(cfg.model.autoencoder, "cpu"), args.weights,
                                args.lora)
        pipeline = "DiTPipeline" if cfg.model.kind == "dit" else "LDMPipeline"
        print(f"wrote {out}: load it with diffusers.{pipeline}.from_pretrained({str(out)!r})"
              + (" (class_labels=[...]; guidance_scale > 1 takes class 1000 as 'no label', so only with 1000 classes)"
                 if pipeline == "DiTPipeline" else ""))
        return 0
    out = export_diffusers(args.run_dir, args.out, which=args.weights, adapters=args.lora)
    flow = cfg.diffusion.process == "flow"  # scheduler FlowMatchEulerDiscreteScheduler, a README with the loop
    loop = f"; {out / 'README.md'} has the loop that samples it (class labels, guidance)" if flow else ""
    if (out / "transformer").is_dir():  # a DiT: no pipeline without a VAE
        scheduler = "FlowMatchEulerDiscreteScheduler" if flow else "DDPMScheduler"
        print(f"wrote {out}: load it with diffusers.DiTTransformer2DModel.from_pretrained({str(out / 'transformer')!r})"
              f" and {scheduler}.from_pretrained({str(out / 'scheduler')!r}) (DiTPipeline needs a VAE){loop}")
        return 0
    print(f"wrote {out}: load it with diffusers.DDPMPipeline.from_pretrained({str(out)!r}){loop}")
    return 0


def cmd_data_check(args) -> int:
    return check_folder(args.dir, tuple(args.image_size), args.channels, limit=args.limit)


def cmd_demo(args) -> int:
    serve_demo(args.run_dirs, host=args.host, port=args.port, max_samples=args.max_samples, max_steps=args.max_steps,
               queue_size=args.queue_size, device=args.device, out_root=args.out, auth=args.auth,
               max_upload_mb=args.max_upload_mb, keep_requests=args.keep_requests)
    return 0


# ------------------------------------------------------------------------------ the parser


# ------------------------------------------------------------------------------ main
