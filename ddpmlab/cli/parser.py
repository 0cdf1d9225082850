"""The ``ddpm`` argument parser: every subcommand, its options and help texts."""

from __future__ import annotations

import argparse

from ddpmlab.cli.commands import (
    cmd_data_check,
    cmd_demo,
    cmd_distill,
    cmd_ema,
    cmd_export,
    cmd_finetune,
    cmd_reflow,
    cmd_train,
    cmd_train_autoencoder,
)
from ddpmlab.cli.controlnet import train_controlnet_parser
from ddpmlab.cli.data import shapes_parser, shards_parser, spoken_digits_parser
from ddpmlab.cli.parser_sampling import (
    bench_parser,
    editing_parsers,
    eval_parser,
    sample_parser,
    upscale_parser,
    viz_parser,
)
from ddpmlab.cli.vocode import vocode_parser
from ddpmlab.config import describe_config
from ddpmlab.demo import KEEP_REQUESTS, UPLOAD_MB

EPILOG = "Examples:\n  ddpm train\n  ddpm train --config toy2d\n  ddpm sample runs/mnist-... --sampler ddim --steps 50"


def _train_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="train a model (default: the quick MNIST config)",
        description="Train a DDPM. With no arguments: the bundled MNIST digits (configs/mnist.yaml).\n"
                    "Override any config key as key=value, e.g. train.steps=2000 unet.base_channels=64;\n"
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


def _train_autoencoder_parser(sub) -> None:
    keys = "".join(line + "\n" for line in describe_config().splitlines()
                   if line.startswith(("autoencoder.", "data.", "train.")))
    t = sub.add_parser(
        "train-autoencoder", help="train the autoencoder of latent diffusion (first stage, Rombach et al. 2022)",
        description="Train a KL-regularised autoencoder (diffusers' AutoencoderKL; Rombach et al. 2022) on the\n"
                    "images of data.*, with the recipe of train.* and the network and loss of autoencoder.*\n"
                    "(L1/L2 reconstruction + autoencoder.kl_weight * KL; optional PatchGAN,\n"
                    "autoencoder.discriminator).\n"
                    "At the end it writes RUN/autoencoder.json: reconstruction PSNR on held-out images, latent\n"
                    "mean/std and the scale factor 1/std. Then train diffusion on its latents:\n"
                    "  ddpm train --config mnist_latent model.autoencoder=RUN\n"
                    "Default config: mnist_autoencoder (writes runs/mnist-autoencoder).",
        epilog="Config keys (section.key, type, default):\n" + keys,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--config", help="YAML file or bundled config name; default: mnist_autoencoder")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue this autoencoder run from its newest checkpoint")
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--force", action="store_true", help="with --resume: allow changing stored config keys")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=500")
    t.set_defaults(func=cmd_train_autoencoder, parser=t)


def _export_and_data_parsers(sub) -> None:
    em = sub.add_parser("ema", help="the EMA of any width after training (power-function EMA, EDM2)",
                        description="Reconstruct the power-function EMA of relative width --sigma-rel (Karras et "
                                    "al. 2024) from the snapshots a run trained with train.ema_profiles wrote to "
                                    "RUN_DIR/ema/, and write its weights; sample them with ddpm sample RUN_DIR "
                                    "--weights-file FILE.")
    em.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with train.ema_profiles")
    em.add_argument("--sigma-rel", type=float, required=True, help="relative EMA width, e.g. 0.05 (in (0, 0.2886))")
    em.add_argument("--step", type=int, default=None, help="the EMA at this step (default: the last snapshot)")
    em.add_argument("--out", default=None,
                    help="weights file (default RUN_DIR/ema/posthoc_sigma<S>_step<N>.safetensors)")
    em.set_defaults(func=cmd_ema, parser=em)

    ex = sub.add_parser("export", help="write a run in another library's format (diffusers)",
                        description="Export a trained run. --format diffusers writes a folder that "
                                    "diffusers.DDPMPipeline.from_pretrained(OUT) loads (UNet2DModel + DDPMScheduler, "
                                    "safetensors); a DiT run (model.kind dit) is written as OUT/transformer "
                                    "(DiTTransformer2DModel) + OUT/scheduler; a latent run (model.autoencoder) as an "
                                    "LDMPipeline (UNet) or DiTPipeline (DiT) folder with its VAE; a latent text run as a "
                                    "StableDiffusionPipeline (UNet, frozen CLIP) or PixArtAlphaPipeline (DiT, frozen "
                                    "T5) folder; a flow run "
                                    "(diffusion.process flow) with FlowMatchEulerDiscreteScheduler and OUT/README.md "
                                    "holding the loop that samples it; options diffusers cannot express are refused "
                                    "by name.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ex.add_argument("out", metavar="OUT", help="new output folder")
    ex.add_argument("--format", default="diffusers", choices=["diffusers"], help="output format (default diffusers)")
    ex.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    ex.add_argument("--merge", action="store_true",
                    help="bake LoRA adapters into the exported weights: a LoRA run's own (which needs it) and those "
                         "of --lora")
    ex.add_argument("--lora", action="append", default=[], metavar="ADAPTER[:SCALE]",
                    help="a LoRA adapter to bake in with --merge, its update times SCALE (default 1); repeatable")
    ex.set_defaults(func=cmd_export, parser=ex)

    da = sub.add_parser("data", help="inspect a dataset (ddpm data check DIR) or write one (ddpm data shapes OUT, "
                                       "ddpm data shards SRC OUT, ddpm data spoken-digits OUT)")
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
    shapes_parser(dsub)
    shards_parser(dsub)
    spoken_digits_parser(dsub)


def _user_password(text: str) -> tuple:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError(f"expected USER:PASSWORD, got {text!r}")
    return user, password


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="a local web page to sample, inspect and edit runs (needs ddpmlab[demo])",
                       description="Serve a Gradio page over one or more trained runs: sample (grid and downloads), "
                                   "the reverse process, inpainting (RePaint) and img2img (SDEdit) with a brush, two "
                                   "samplers on the same noise, and each run's config, loss and eval metrics. The "
                                   "page makes the same library calls as ddpm sample / inpaint / img2img / viz, so "
                                   "the same settings and seed give the same pixels. Install: pip install "
                                   "'ddpmlab[demo]'.")
    d.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="runs written by `ddpm train` (a picker on the page)")
    d.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; another one without --auth "
                        "is served with a warning)")
    d.add_argument("--auth", type=_user_password, default=None, metavar="USER:PASSWORD",
                   help="ask for this user name and password before the page opens (Gradio's login)")
    d.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    d.add_argument("--max-samples", type=int, default=256,
                   help="largest n one request may ask for (default 256); bigger requests are refused")
    d.add_argument("--max-steps", type=int, default=1000,
                   help="most sampling steps one request may ask for (default 1000; RePaint's jumps count as the "
                        "steps they repeat); more are refused")
    d.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait (default 16); sampling runs one request at a time")
    d.add_argument("--device", default="auto", help="auto (default: cuda, mps or cpu), cpu, cuda, cuda:N or mps")
    d.add_argument("--out", default=None,
                   help="the page writes its pictures to a new folder ddpm-demo-XXXXXXXX in this one, and serves "
                        "only that (default: a new temporary folder)")
    d.add_argument("--keep-requests", type=int, default=KEEP_REQUESTS, metavar="K",
                   help=f"keep the pictures of the newest K requests, delete older ones (default {KEEP_REQUESTS})")
    d.add_argument("--max-upload-mb", type=int, default=UPLOAD_MB, metavar="MB",
                   help=f"largest file a visitor may upload (default {UPLOAD_MB} MB)")
    d.set_defaults(func=cmd_demo, parser=d)


def _distill_parser(sub) -> None:
    d = sub.add_parser(
        "distill", help="distill a run into a 1-8 step student (progressive or consistency)",
        description="Distill the EMA weights of RUN into a few-step student in a new run folder beside it.\n"
                    "progressive (Salimans & Ho 2022): rounds halve distill.teacher_steps DDIM steps down to --steps\n"
                    "(a power of two); consistency (Song et al. 2023): one consistency function, sampled in --steps\n"
                    "(or any number of) steps. The student samples with ddpm sample STUDENT_RUN (sampler student).\n"
                    "Keys: distill.* and train.{seed,device,name,out_dir,log_every,save_every,...} as key=value.",
        epilog="Examples:\n  ddpm distill runs/mnist-... --method progressive --steps 4 distill.iterations=[1000]\n"
               "  ddpm distill runs/toy-... --method consistency --steps 1\n"
               "  ddpm distill --resume runs/mnist-...-progressive4-...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d.add_argument("run_dir", metavar="RUN", nargs="?", help="the teacher: a folder written by `ddpm train`")
    d.add_argument("--method", default="progressive", choices=["progressive", "consistency"],
                   help="progressive (default) or consistency")
    d.add_argument("--steps", type=int, default=None, help="the student's sampling steps (default distill.steps, 4)")
    d.add_argument("--resume", metavar="STUDENT_RUN", help="continue this distillation from its newest checkpoint")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. distill.iterations=[2000,1000]")
    d.set_defaults(func=cmd_distill, parser=d)


def _reflow_parser(sub) -> None:
    r = sub.add_parser(
        "reflow", help="retrain a flow run on its own (noise, sample) pairs: straighter paths, 1-2 step samples",
        description="Reflow (Liu et al. 2023): the teacher flow run's ODE sampler draws --pairs (noise, sample)\n"
                    "pairs into a new run folder beside it (RUN/pairs, in chunks that --resume does not redraw);\n"
                    "then a network initialised from the teacher's EMA weights learns the straight path from each\n"
                    "noise to its sample. The result is a flow run whose samples take one Euler step\n"
                    "(ddpm sample RUN; --steps 2 --step-schedule trailing for two).\n"
                    "Keys: reflow.*, train.* and diffusion.{t_sampling,logit_normal_*,mode_scale,loss} as key=value.",
        epilog="Examples:\n  ddpm reflow runs/toy-... --pairs 20000 train.steps=3000\n"
               "  ddpm reflow runs/mnist-... --pairs 10000 --steps 50 reflow.sampler=flow_heun\n"
               "  ddpm reflow --resume runs/mnist-...-reflow-...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("run_dir", metavar="RUN", nargs="?", help="the teacher: a flow run (diffusion.process flow)")
    r.add_argument("--pairs", type=int, default=None, help="pairs to draw (default reflow.pairs, 10000)")
    r.add_argument("--steps", type=int, default=None,
                   help="the teacher's sampling steps for the pairs (default its train.sample_steps)")
    r.add_argument("--resume", metavar="REFLOW_RUN", help="continue this reflow: the missing pairs, then training")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.steps=2000 reflow.sampler=flow_heun")
    r.set_defaults(func=cmd_reflow, parser=r)


def _finetune_parser(sub) -> None:
    f = sub.add_parser(
        "finetune", help="fine-tune a run or a diffusers UNet2DModel on new data: all weights or LoRA adapters",
        description="Fine-tune SRC (a run folder, or a local diffusers UNet2DModel folder) on the data that data.*\n"
                    "names: a new run beside SRC whose network starts from SRC's EMA weights, with its own config,\n"
                    "checkpoints, resume and EMA. --method full trains every weight; --method lora (Hu et al. 2022)\n"
                    "trains low-rank adapters of the layers lora.target_modules names (default: the attention\n"
                    "projections) and writes them alone to RUN/adapter.safetensors, which ddpm sample BASE --lora\n"
                    "applies. A text run also takes --method textual-inversion (Gal et al. 2022: only a new\n"
                    "token's embedding, finetune.token and finetune.init_token) and --method dreambooth (Ruiz et al.\n"
                    "2023: a few images under finetune.token finetune.class_word, prior preservation from\n"
                    "finetune.class_images drawn by SRC; finetune.lora=true for adapters). Keys: train.*, data.*,\n"
                    "lora.*, finetune.* as key=value (the model and diffusion stay SRC's).",
        epilog="Examples:\n  ddpm finetune runs/mnist-... --method lora data.dataset=folder data.path=style/ "
               "data.channels=1 data.image_size=28 train.steps=300\n"
               "  ddpm finetune runs/mnist-... --method full data.dataset=digits train.steps=200 train.minutes=null\n"
               "  ddpm finetune runs/shapes_text-... --method textual-inversion finetune.token=\"<concept>\" "
               "finetune.init_token=square data.path=few/ train.steps=300\n"
               "  ddpm finetune runs/shapes_text-... --method dreambooth finetune.token=sks finetune.class_word=square "
               "data.path=few/ finetune.class_images=50\n"
               "  ddpm finetune --resume runs/mnist-...-lora-...",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("source", metavar="SRC", nargs="?", help="a run folder or a diffusers UNet2DModel folder")
    f.add_argument("--method", default="full", choices=["full", "lora", "textual-inversion", "dreambooth"],
                   help="full (default), lora, textual-inversion or dreambooth (the last two: text runs)")
    f.add_argument("--resume", metavar="FINETUNE_RUN", help="continue this fine-tuning from its newest checkpoint")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument("overrides", nargs="*", metavar="key=value",
                   help="e.g. data.path=style/ train.steps=300 lora.rank=8")
    f.set_defaults(func=cmd_finetune, parser=f)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm", description="ddpmlab: train, sample and study denoising diffusion probabilistic models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_parser, _train_autoencoder_parser, sample_parser, editing_parsers, upscale_parser,
                vocode_parser, eval_parser, _export_and_data_parsers, viz_parser, bench_parser, _demo_parser,
                _distill_parser, _reflow_parser, _finetune_parser, train_controlnet_parser):
        add(sub)
    return p
