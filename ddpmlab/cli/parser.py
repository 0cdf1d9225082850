"""The ``ddpm`` argument parser: every subcommand, its options and help texts."""

from __future__ import annotations

import argparse
from typing import Optional

from ddpmlab.cli.commands import (
    cmd_bench,
    cmd_data_check,
    cmd_demo,
    cmd_distill,
    cmd_ema,
    cmd_eval,
    cmd_export,
    cmd_img2img,
    cmd_inpaint,
    cmd_sample,
    cmd_train,
    cmd_train_autoencoder,
    cmd_upscale,
    cmd_viz,
)
from ddpmlab.config import describe_config
from ddpmlab.diffusion.reverse import VARIANCE_ALIASES, VARIANCES
from ddpmlab.diffusion.schedules import SCHEDULES
from ddpmlab.evaluate import bench
from ddpmlab.samplers.registry import SAMPLER_SPECS, STEP_SCHEDULES

EPILOG = "Examples:\n  ddpm train\n  ddpm train --config toy2d\n  ddpm sample runs/mnist-... --sampler ddim --steps 50"


SAMPLERS_HELP = ", ".join(SAMPLER_SPECS)


VARIANCE_HELP = (f"reverse variance of ddpm: {', '.join(VARIANCES)} (or "
                 f"{', '.join(f'{a}' for a in VARIANCE_ALIASES)}); default: the run's diffusion.variance")


def _run_options(p: argparse.ArgumentParser, batch_size: int, seed: bool = True) -> None:
    """Options every command that loads a run shares."""
    if seed:
        p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per batch (default {batch_size})")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto (default: cuda, mps or cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _sampling_options(p: argparse.ArgumentParser, sampler: Optional[str] = "ddim", conditional: bool = True) -> None:
    """The options of one sampler call (see ddpmlab.runs.plan_sampling); sampler None: the run's recommendation."""
    default = (f"default {sampler}" if sampler else "default: the best per NFE that `ddpm bench samplers RUN` "
               "recorded in RUN/recommended_samplers.json, else the run's own (train.sample_sampler and sample_steps)")
    p.add_argument("--sampler", default=sampler, help=f"one of: {SAMPLERS_HELP} ({default})")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps = model evaluations (default: all timesteps for ddpm, 50 otherwise)")
    p.add_argument("--timesteps", default=None, metavar="NAME",
                   help=f"step schedule: {', '.join(STEP_SCHEDULES)}; ddpm and ddim take uniform, leading or "
                        "trailing; optimized is fitted to this model on calibration noise first; default: the "
                        "sampler's own (ddim: uniform, dpmpp/unipc: logsnr, euler/heun: karras)")
    p.add_argument("--eta", type=float, default=None, help="DDIM noise: 0 deterministic (default), 1 DDPM-like")
    p.add_argument("--variance", default=None, help=VARIANCE_HELP)
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="dynamic thresholding of predicted x0 at percentile P, e.g. 0.995 (Saharia et al. 2022); "
                        "replaces the clip to [-1, 1]")
    if conditional:
        p.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
        p.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                       help="classifier-free guidance scale (conditional models): 1 conditional, 0 unconditional, "
                            ">1 stronger; without --class the samples cycle through all classes")


def _train_parser(sub) -> None:
    t = sub.add_parser(
        "train", help="train a model (default: the quick MNIST config)",
        description="Train a DDPM. With no arguments: the bundled MNIST digits (configs/mnist.yaml).\n"
                    "Override any config key as key=value, e.g. train.steps=2000 model.base_channels=64;\n"
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


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run and write a PNG grid (images) or a scatter plot (2D data).")
    s.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a folder written by `ddpm train`")
    s.add_argument("--from-diffusers", metavar="FOLDER",
                   help="sample a local diffusers UNet2DModel + scheduler folder instead of a run (e.g. a downloaded "
                        "google/ddpm-cifar10-32; nothing is downloaded); output goes to ./samples/")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    _sampling_options(s, sampler=None)
    _run_options(s, batch_size=256)
    s.add_argument("--weights-file", metavar="FILE",
                   help="use these weights with RUN_DIR's config: .safetensors, or a PyTorch state dict "
                        "(loaded with weights_only=True: pickles that would run code are refused)")
    s.add_argument("--out", help="a picture file (.png, ...) or a folder (one PNG per sample plus grid.png); "
                                 "default RUN_DIR/samples/<sampler>_<steps>steps_seed<seed>.png")
    s.add_argument("--npz", action="store_true", help="also save the raw samples as .npz (written first)")
    s.set_defaults(func=cmd_sample, parser=s)


def _edit_parser(sub, name: str, help: str, description: str):
    e = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train` (an image model)")
    e.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...); converted to the model's channels")
    e.add_argument("--resize", action="store_true",
                   help="scale and center-crop the input(s) to the model's image size (default: sizes must match)")
    e.add_argument("--n", type=int, default=4, help="number of results (default 4)")
    _run_options(e, batch_size=64)
    return e


def _editing_parsers(sub) -> None:
    ip = _edit_parser(sub, "inpaint", "fill a masked region of an image (RePaint)",
                      "Fill the white region of --mask in --image with a trained model (RePaint, Lugmayr et al. "
                      "2022): the black region is kept exactly. Writes one row: input, mask, then the --n results.\n"
                      "The mask is a PNG of the same size as the image: white (> 50% grey) = fill, black = keep.")
    ip.add_argument("--mask", required=True, help="PNG mask, same size as the image: white = fill, black = keep")
    ip.add_argument("--steps", type=int, default=250, help="respaced diffusion steps (default 250, as the paper)")
    ip.add_argument("--timesteps", default=None, metavar="NAME",
                    help="which timesteps the respaced steps use: uniform (default), leading or trailing")
    ip.add_argument("--variance", default=None, help=VARIANCE_HELP)
    ip.add_argument("--class", dest="label", type=int, default=None, help="class label (conditional models)")
    ip.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                    help="classifier-free guidance scale (conditional models)")
    ip.add_argument("--jump-length", type=int, default=10,
                    help="resampling: go back this many steps at each jump point (default 10)")
    ip.add_argument("--jump-n-sample", type=int, default=10,
                    help="resampling: denoise each stretch this many times (default 10; 1 = no resampling)")
    ip.add_argument("--out", help="picture file or folder (default RUN_DIR/samples/inpaint_<image>_seed<seed>.png)")
    ip.set_defaults(func=cmd_inpaint, parser=ip)

    ii = _edit_parser(sub, "img2img", "redraw an image from a noised copy (SDEdit)",
                      "SDEdit (Meng et al. 2022): noise --image to t0 = strength * T, then denoise it back with "
                      "any sampler. strength 0 returns the input, 1 ignores it. Writes one row: input, then the "
                      "--n results.")
    ii.add_argument("--strength", type=float, default=0.5, help="how far to noise, in [0, 1] (default 0.5)")
    _sampling_options(ii)
    ii.add_argument("--out", help="picture file or folder "
                                  "(default RUN_DIR/samples/img2img_<image>_strength<s>_seed<seed>.png)")
    ii.set_defaults(func=cmd_img2img, parser=ii)


UPSCALE_HELP = """Upscale a low-resolution picture with a super-resolution run (SR3, Saharia et al. 2021):
trained with model.condition=low_res, e.g. `ddpm train --config mnist_sr` (7x7 -> 28x28 digits).
The picture must have the run's data.low_res size; it is upsampled by the run's data.upsample
and given to the denoiser beside x_t at every step of the sampler.

Output: one upscale (--n 1, the default) is written as a picture of the run's image size;
several (--n K) or a folder --out as one row: the input (nearest pixels), then the K upscales
(a folder also gets one PNG per upscale).

Examples:
  ddpm upscale runs/mnist-sr-... --image low.png --out up.png
  ddpm upscale runs/mnist-sr-... --image low.png --n 8 --sampler ddpm --steps 250 --seed 1
"""


def _upscale_parser(sub) -> None:
    u = sub.add_parser("upscale", help="upscale a low-res picture with a super-resolution run (SR3)",
                       description=UPSCALE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with model.condition=low_res")
    u.add_argument("--image", required=True, help="the low-res picture (PNG, JPEG, ...), of the run's data.low_res "
                                                  "size; converted to the run's channels")
    u.add_argument("--n", type=int, default=1, help="upscales of the picture, each from its own noise (default 1)")
    _sampling_options(u)
    _run_options(u, batch_size=64)
    u.add_argument("--out", help="a picture file or a folder (default RUN_DIR/samples/upscale_<image>_<sampler>_"
                                 "<steps>steps_seed<seed>.png)")
    u.set_defaults(func=cmd_upscale, parser=u)


EVAL_HELP = """Evaluate a trained run (its newest checkpoint, EMA weights by default).

Sample quality (the default): draw --n samples, extract features once with the extractor in
eval mode, and compare them with reference statistics of the run's whole dataset (cached in
~/.cache/ddpmlab, keyed by the data's content and the extractor):
  fid   Frechet distance of features      kid  kernel distance (unbiased MMD^2)
  is    Inception Score                   pr   precision and recall (k=3 nearest neighbours)
  acc   classifier accuracy of class-conditional samples
  swd, mmd  sliced Wasserstein distance and MMD to fresh data (2-D runs)
The same metrics of --n data points are printed beside: what a perfect model would reach
with this many samples. Extractors: 'classifier' (shipped MNIST classifier, 1x28x28 digits,
offline) or 'inception' (the FID Inception-v3; needs --inception-weights PATH to
pt_inception-2015-12-05-6726825d.pth, never downloaded). Results: RUN_DIR/eval/*.json with
everything needed to reproduce them.

nll: the variational bound (Ho et al. 2020, Eq. 5) on held-out data in bits/dim, with its
terms (prior L_T, decoder L_0, sum of KL terms), written to RUN_DIR/eval/nll.json and
nll_vs_t.png.

Super-resolution runs (model.condition=low_res) are scored instead on --n held-out images
(default 500, the MNIST test split): their low-res versions are upscaled by the model and by
bicubic interpolation, and both are compared with the true images by PSNR, SSIM (Wang et al.
2004) and classifier FID; written to RUN_DIR/eval/superres_*.json, with a picture of examples.

Examples:
  ddpm eval runs/mnist-...                        classifier FID/KID/IS/PR of 1000 DDIM-50 samples
  ddpm eval runs/mnist-... --metrics fid --n 5000 --sampler ddpm --steps 250
  ddpm eval runs/cifar-... --extractor inception --inception-weights ~/pt_inception-2015-12-05-6726825d.pth
  ddpm eval runs/toy2d-...                        sliced Wasserstein and MMD
"""


def _eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained run (FID/KID/IS/precision-recall, SWD/MMD, NLL)",
                        description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ev.add_argument("--metrics", default="",
                    help="comma-separated list of fid, kid, is, pr, acc (images), swd, mmd (2-D), nll "
                         "(default: fid,kid,is,pr for images, swd,mmd for 2-D; acc too for conditional runs)")
    ev.add_argument("--n", type=int, default=None,
                    help="samples to draw for the quality metrics (default 1000); for nll the number of held-out "
                         "examples (default: the whole test split; 5000 fresh 2-D points)")
    _sampling_options(ev)
    ev.add_argument("--extractor", default=None, choices=["classifier", "inception"],
                    help="feature network (default: classifier, or inception when --inception-weights is given)")
    ev.add_argument("--inception-weights", default=None, metavar="PATH",
                    help="local FID Inception-v3 weights (pt_inception-2015-12-05-6726825d.pth or .safetensors)")
    ev.add_argument("--cache-dir", default=None,
                    help="reference-statistics cache (default $DDPMLAB_CACHE or ~/.cache/ddpmlab)")
    ev.add_argument("--no-cache", action="store_true", help="recompute the reference statistics, store nothing")
    ev.add_argument("--no-baseline", action="store_true", help="skip the same metrics of --n data points")
    ev.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval/step..._<sampler>..._n<n>.json)")
    ev.add_argument("--decoder", default="discretized", choices=["discretized", "continuous"],
                    help="nll: p(x_0|x_1) a discretized Gaussian (Eq. 13; 8-bit data, or give --bin-width) or "
                         "the continuous density (a differential NLL, for 2-D points)")
    ev.add_argument("--bin-width", type=float, default=None,
                    help="nll: bin width of non-8-bit data on the model's scale, e.g. 0.125 for the 17-level digits")
    ev.add_argument("--t-stride", type=int, default=1,
                    help="nll: one random t in every block of this many (an unbiased estimate; default 1: all T)")
    _run_options(ev, batch_size=250)
    ev.set_defaults(func=cmd_eval, parser=ev)


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
                                    "LDMPipeline (UNet) or DiTPipeline (DiT) folder with its VAE; options diffusers "
                                    "cannot express are refused by name.")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ex.add_argument("out", metavar="OUT", help="new output folder")
    ex.add_argument("--format", default="diffusers", choices=["diffusers"], help="output format (default diffusers)")
    ex.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    ex.set_defaults(func=cmd_export, parser=ex)

    da = sub.add_parser("data", help="inspect a dataset without training (ddpm data check DIR)")
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


VIZ_HELP = """Pictures of diffusion. Each command writes PNG/GIF files and prints their paths;
files of a run go to RUN_DIR/viz/ (others to ./viz/) unless --out is given.

  forward   [RUN_DIR] [--config C]  images (or 2-D data) noised by q(x_t | x_0) at several t
  reverse   RUN_DIR                 GIF of x_t and the predicted x0 along sampling + a strip of stills
  schedules                         beta_t, alpha_bar_t and log-SNR of the schedules side by side
  toy       [RUN_DIR]               2-D data, forward diffusion, reverse process: stills and a GIF
  loss      RUN_DIR [RUN_DIR ...]   training loss curves (and train.eval_every metrics) from the logs
  grid      RUN_DIR | --npz FILE    a grid of fresh samples, or of samples saved by `ddpm sample --npz`

Examples:
  ddpm viz forward --config mnist --n 4
  ddpm viz reverse runs/mnist-... --sampler ddim --steps 50 --n 16
  ddpm viz schedules --T 1000
  ddpm viz toy runs/toy-...
  ddpm viz loss runs/mnist-a runs/mnist-b
Sample metrics over training live in TensorBoard too: tensorboard --logdir runs
"""


def _viz_sampling_parser(vs, name: str, help: str, description: str, sampler: str = "ddim", n: int = 16,
                         run_required: bool = True):
    p = vs.add_parser(name, help=help, description=description)
    p.add_argument("run_dir", metavar="RUN_DIR", nargs=None if run_required else "?", help="a run written by "
                   "`ddpm train`")
    _sampling_options(p, sampler, conditional=False)
    p.add_argument("--n", type=int, default=n, help=f"number of samples (default {n})")
    _run_options(p, batch_size=256)
    p.add_argument("--out", help="output folder (default RUN_DIR/viz)")
    p.set_defaults(parser=p)
    return p


def _viz_parser(sub) -> None:
    v = sub.add_parser("viz", help="pictures: forward/reverse process, schedules, 2-D toy, loss, grids",
                       description=VIZ_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.set_defaults(func=cmd_viz, parser=v)
    vs = v.add_subparsers(dest="viz_command", metavar="KIND", required=True)
    f = vs.add_parser("forward", help="images noised by the forward process at several t",
                      description="Rows: --n training images; columns: x_t ~ q(x_t | x_0) at the timesteps --t, "
                                  "one noise draw shared by all t (Ho et al. 2020, Eq. 4). 2-D data: the whole "
                                  "set at each t. Uses the run's data and schedule, or those of --config.")
    f.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run (default: the data of --config)")
    f.add_argument("--config", default=None, help="bundled config name or YAML file when no RUN_DIR (default mnist)")
    f.add_argument("--n", type=int, default=4, help="number of images (default 4)")
    f.add_argument("--t", default=None, help="comma-separated timesteps (default 0,50,100,200,300,500,700,T-1)")
    f.add_argument("--seed", type=int, default=0, help="seed of the images picked and of the noise (default 0)")
    f.add_argument("--out", help="output folder (default RUN_DIR/viz or ./viz)")
    f.set_defaults(parser=f)

    r = _viz_sampling_parser(vs, "reverse", "GIF and stills of x_t and the predicted x0 along sampling",
                             "Sample --n images and record --frames snapshots of x_t (left) and of the model's "
                             "prediction of x_0 (right): reverse_<sampler><steps>.gif and .png.")
    r.add_argument("--frames", type=int, default=25, help="snapshots along sampling (default 25)")

    sc = vs.add_parser("schedules", help="beta_t, alpha_bar_t and log-SNR of the noise schedules",
                       description="Three panels side by side: beta_t (log scale), alpha_bar_t and "
                                   "log-SNR = log(alpha_bar / (1 - alpha_bar)) against t, one line per schedule.")
    sc.add_argument("--schedules", default=",".join(SCHEDULES), help=f"comma-separated (default {','.join(SCHEDULES)})")
    sc.add_argument("--T", type=int, default=1000, help="number of timesteps (default 1000)")
    sc.add_argument("--beta-start", type=float, default=1e-4, help="beta_1 of the schedules that take it (1e-4)")
    sc.add_argument("--beta-end", type=float, default=0.02, help="beta_T of the schedules that take it (0.02)")
    sc.add_argument("--out", help="output PNG or folder (default ./viz/schedules.png)")
    sc.set_defaults(parser=sc)

    ty = _viz_sampling_parser(vs, "toy", "2-D data, forward diffusion and reverse process (stills and GIF)",
                              "toy_data.png, toy_forward.png; with a RUN_DIR also toy_reverse.png (samples along "
                              "the reverse process over the data in grey) and toy_diffusion.gif (forward, then "
                              "reverse).", sampler="ddpm", n=2000, run_required=False)
    ty.add_argument("--config", default=None, help="config when no RUN_DIR (default toy2d)")
    ty.add_argument("--frames", type=int, default=25, help="reverse-process snapshots (default 25)")

    lo = vs.add_parser("loss", help="training loss curves (and eval metrics) of one or more runs",
                       description="Loss from RUN_DIR/log.csv (raw, and smoothed by an exponential moving "
                                   "average), and the metrics of RUN_DIR/eval.csv (train.eval_every) beside it.")
    lo.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="runs written by `ddpm train`")
    lo.add_argument("--smooth", type=float, default=0.8, help="EMA weight of the smoothed curve (default 0.8)")
    lo.add_argument("--out", help="output PNG or folder (default RUN_DIR/viz/loss.png of the first run)")
    lo.set_defaults(parser=lo)

    g = _viz_sampling_parser(vs, "grid", "a grid of samples (fresh, or from `ddpm sample --npz`)",
                             "Sample a run and write a grid (images) or scatter plot (2-D), or draw the samples "
                             "of an .npz file written by `ddpm sample --npz`.", n=64, run_required=False)
    g.add_argument("--npz", default=None, help="samples saved by `ddpm sample --npz` instead of sampling")


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks: sampler error vs NFE (ddpm bench samplers ...)")
    bsub = b.add_subparsers(dest="bench_command", metavar="WHAT", required=True)
    bs = bsub.add_parser(
        "samplers", help="error of each sampler per NFE against a reference",
        description="For each sampler and NFE: the sliced Wasserstein-2 distance of its samples to a reference, "
                    "as a multiple of the two-sample floor (the distance between two independent reference sets; "
                    "1.0 = as close as sampling noise allows).\nRUN_DIR: reference = an ancestral (ddpm) run with "
                    "--reference-steps steps from the same noise seeds.\n--analytic: the exact noise predictor of a "
                    "Gaussian mixture, reference = exact samples.\nWrites sampler_bench.md/.png/.json to --out "
                    "(default RUN_DIR/bench or runs/bench-<target>).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    bs.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a folder written by `ddpm train`")
    bs.add_argument("--analytic", choices=["mixture2d", "mixture64d"], help="built-in target, no checkpoint needed")
    bs.add_argument("--samplers", default=",".join(bench.DEFAULT_SAMPLERS),
                    help="comma-separated NAME or NAME:TIMESTEPS, e.g. dpmpp_2m:karras,unipc:optimized "
                         f"(default {','.join(bench.DEFAULT_SAMPLERS)})")
    bs.add_argument("--nfe", default="5,10,20,50", help="model evaluations to test (default 5,10,20,50)")
    bs.add_argument("--n", type=int, default=None, help="samples per set (default 256 for a run, 20000 analytic)")
    bs.add_argument("--reference-steps", type=int, default=1000, help="ancestral steps of the reference (default 1000)")
    _run_options(bs, batch_size=256)
    bs.add_argument("--out", help="output folder")
    bs.set_defaults(func=cmd_bench, parser=bs)


def _demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="a local web page to sample, inspect and edit runs (needs ddpmlab[demo])",
                       description="Serve a Gradio page over one or more trained runs: sample (grid and downloads), "
                                   "the reverse process, inpainting (RePaint) and img2img (SDEdit) with a brush, two "
                                   "samplers on the same noise, and each run's config, loss and eval metrics. The "
                                   "page makes the same library calls as ddpm sample / inpaint / img2img / viz, so "
                                   "the same settings and seed give the same pixels. Install: pip install "
                                   "'ddpmlab[demo]'.")
    d.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="runs written by `ddpm train` (a picker on the page)")
    d.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    d.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    d.add_argument("--max-samples", type=int, default=256,
                   help="largest n one request may ask for (default 256); bigger requests are refused")
    d.add_argument("--max-steps", type=int, default=1000,
                   help="most sampling steps one request may ask for (default 1000); more are refused")
    d.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait (default 16); sampling runs one request at a time")
    d.add_argument("--device", default="auto", help="auto (default: cuda, mps or cpu), cpu, cuda, cuda:N or mps")
    d.add_argument("--out", default=None, help="folder for the pictures the page writes (default: a new temp folder)")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ddpm", description="ddpmlab: train, sample and study denoising diffusion probabilistic models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_train_parser, _train_autoencoder_parser, _sample_parser, _editing_parsers, _upscale_parser,
                _eval_parser,
                _export_and_data_parsers,
                _viz_parser, _bench_parser, _demo_parser, _distill_parser):
        add(sub)
    return p
