"""The ``ddpm`` options of the commands that sample a run: sample, inpaint, img2img, upscale, eval, viz, bench."""

from __future__ import annotations

import argparse

from ddpmlab.cli.controlnet import controlnet_options
from ddpmlab.cli.options import VARIANCE_ALIASES, OlderSpelling, VarianceName
from ddpmlab.cli.sampling import cmd_img2img, cmd_inpaint, cmd_sample, cmd_upscale
from ddpmlab.cli.study import cmd_bench, cmd_eval, cmd_viz
from ddpmlab.diffusion.reverse import VARIANCES
from ddpmlab.diffusion.schedules import SCHEDULES
from ddpmlab.evaluate import bench
from ddpmlab.samplers.registry import SAMPLER_SPECS, STEP_SCHEDULES

SAMPLERS_HELP = ", ".join(SAMPLER_SPECS)


VARIANCE_HELP = (f"reverse variance of ddpm: {', '.join(VARIANCES)} (the older words "
                 f"{', '.join(VARIANCE_ALIASES)} are read with a note); default: the run's diffusion.variance")


def step_schedule_option(p: argparse.ArgumentParser, help: str) -> None:
    """--step-schedule NAME (which timesteps the sampler visits); the older --timesteps NAME is read with a note."""
    p.add_argument("--step-schedule", dest="step_schedule", default=None, metavar="NAME", help=help)
    p.add_argument("--timesteps", dest="step_schedule", action=OlderSpelling, new="--step-schedule")


def variance_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variance", default=None, action=VarianceName, help=VARIANCE_HELP)


def run_options(p: argparse.ArgumentParser, batch_size: int, seed: bool = True) -> None:
    """Options every command that loads a run shares."""
    if seed:
        p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"samples per batch (default {batch_size})")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    p.add_argument("--device", default="auto", help="auto (default: cuda, mps or cpu), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


CLASS_HELP = "class label, a name or an index (conditional models); --class list lists the run's classes"


def class_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--class", dest="label", default=None, metavar="CLASS", help=CLASS_HELP)


def sampling_options(p: argparse.ArgumentParser, conditional: bool = True, prompts: bool = True) -> None:
    """The options of one sampler call (see ddpmlab.runs.SamplingRequest): none given, the run's own.
    ``prompts``: a text run's --prompt, --prompts and --negative-prompt too (with ``conditional``)."""
    p.add_argument("--sampler", default=None,
                   help=f"one of: {SAMPLERS_HELP} (default: as the run samples: the best per NFE that `ddpm bench "
                        "samplers RUN` recorded in RUN/recommended_samplers.json, else the run's own "
                        "train.sample_sampler, sample_steps and sample_guidance)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps = model evaluations (default: the run's own steps with its own sampler; "
                        "all timesteps for ddpm, 50 otherwise)")
    step_schedule_option(p, f"which timesteps (noise levels) the sampler visits: {', '.join(STEP_SCHEDULES)}; "
                            "ddpm and ddim take uniform, leading or trailing; optimized is fitted to this model on "
                            "calibration noise first; default: the sampler's own (ddim: uniform, dpmpp/unipc: "
                            "logsnr, euler/heun: karras)")
    p.add_argument("--eta", type=float, default=None,
                   help="noise of ddim (0 deterministic, the default; 1 DDPM-like), dpmpp_2m_sde and flow_sde "
                        "(default 1; 0: their ODE)")
    variance_option(p)
    p.add_argument("--threshold", type=float, default=None, metavar="P",
                   help="dynamic thresholding of predicted x0 at percentile P, e.g. 0.995 (Saharia et al. 2022); "
                        "replaces the clip to [-1, 1]")
    if conditional:
        class_option(p)
        p.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                       help="classifier-free guidance scale (conditional and text runs): 1 conditional, 0 "
                            "unconditional, >1 stronger (default: the run's train.sample_guidance); without --class "
                            "the samples cycle through all classes")
        if prompts:
            prompt_options(p)


def prompt_options(p: argparse.ArgumentParser, negative: bool = True) -> None:
    """--prompt, --prompts FILE (and with ``negative`` --negative-prompt): what a text-to-image run (text.encoder
    set) draws."""
    p.add_argument("--prompt", dest="prompt", action="append", default=None, metavar="TEXT",
                   help="what a text-to-image run draws, --n samples of it (repeat for more prompts; a row of the "
                        "grid each); default: the run's own prompts (RUN/samples/prompts.txt, training captions) "
                        "sharing the --n samples")
    p.add_argument("--prompts", dest="prompts_file", default=None, metavar="FILE",
                   help="a text file of prompts, one a line: --n samples of each, grouped per prompt")
    if negative:
        p.add_argument("--negative-prompt", default=None, metavar="TEXT",
                       help="the unconditional branch of classifier-free guidance (default: the empty prompt)")


def sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="draw samples from a trained run",
                       description="Sample a trained run and write a PNG grid (images) or a scatter plot (2D data).")
    s.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a folder written by `ddpm train`")
    s.add_argument("--from-diffusers", metavar="FOLDER",
                   help="sample a local diffusers UNet2DModel + scheduler folder instead of a run (e.g. a downloaded "
                        "google/ddpm-cifar10-32; nothing is downloaded); output goes to ./samples/")
    s.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sampling_options(s)
    run_options(s, batch_size=256)
    s.add_argument("--weights-file", metavar="FILE",
                   help="use these weights with RUN_DIR's config: .safetensors, or a PyTorch state dict "
                        "(loaded with weights_only=True: pickles that would run code are refused)")
    s.add_argument("--lora", action="append", default=[], metavar="ADAPTER[:SCALE]",
                   help="bake a LoRA adapter (a run's adapter.safetensors, or the LoRA run's folder) into the weights, "
                        "its update times SCALE (default 1); repeat to combine several (a LoRA run samples with its "
                        "own adapter already)")
    controlnet_options(s)
    s.add_argument("--out", help="a picture file (.png, ...) or a folder (one PNG per sample plus grid.png); "
                                 "default RUN_DIR/samples/<sampler>_<steps>steps_seed<seed>.png")
    s.add_argument("--npz", action="store_true", help="also save the raw samples as .npz (written first)")
    s.add_argument("--vocoder", metavar="RUN", help="a mel run (data.representation=mel): make sound of its mel "
                                                    "images with this vocoder run instead of Griffin-Lim")
    s.set_defaults(func=cmd_sample, parser=s)


def edit_parser(sub, name: str, help: str, description: str):
    e = sub.add_parser(name, help=help, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train` (an image model)")
    e.add_argument("--image", required=True, help="input picture (PNG, JPEG, ...); converted to the model's channels")
    e.add_argument("--resize", action="store_true",
                   help="scale and center-crop the input(s) to the model's image size (default: sizes must match)")
    e.add_argument("--n", type=int, default=4, help="number of results (default 4)")
    run_options(e, batch_size=64)
    return e


def editing_parsers(sub) -> None:
    ip = edit_parser(sub, "inpaint", "fill a masked region of an image (RePaint)",
                      "Fill the white region of --mask in --image with a trained model (RePaint, Lugmayr et al. "
                      "2022): the black region is kept exactly. Writes one row: input, mask, then the --n results.\n"
                      "The mask is a PNG of the same size as the image: white (> 50% grey) = fill, black = keep.")
    ip.add_argument("--mask", required=True, help="PNG mask, same size as the image: white = fill, black = keep")
    ip.add_argument("--steps", type=int, default=250, help="respaced diffusion steps (default 250, as the paper)")
    step_schedule_option(ip, "which timesteps the respaced steps visit: uniform (default), leading or trailing")
    variance_option(ip)
    class_option(ip)
    ip.add_argument("--guidance", type=float, default=None, metavar="SCALE",
                    help="classifier-free guidance scale (conditional models; default: the run's "
                         "train.sample_guidance where --class is given)")
    ip.add_argument("--jump-length", type=int, default=10,
                    help="resampling: go back this many steps at each jump point (default 10)")
    ip.add_argument("--jump-n-sample", type=int, default=10,
                    help="resampling: denoise each stretch this many times (default 10; 1 = no resampling)")
    ip.add_argument("--out", help="picture file or folder (default RUN_DIR/samples/inpaint_<image>_seed<seed>.png)")
    ip.set_defaults(func=cmd_inpaint, parser=ip)

    ii = edit_parser(sub, "img2img", "redraw an image from a noised copy (SDEdit)",
                      "SDEdit (Meng et al. 2022): noise --image to t0 = strength * T, then denoise it back with "
                      "any sampler. strength 0 returns the input, 1 ignores it. Writes one row: input, then the "
                      "--n results.")
    ii.add_argument("--strength", type=float, default=0.5, help="how far to noise, in [0, 1] (default 0.5)")
    sampling_options(ii)
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


def upscale_parser(sub) -> None:
    u = sub.add_parser("upscale", help="upscale a low-res picture with a super-resolution run (SR3)",
                       description=UPSCALE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    u.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with model.condition=low_res")
    u.add_argument("--image", required=True, help="the low-res picture (PNG, JPEG, ...), of the run's data.low_res "
                                                  "size; converted to the run's channels")
    u.add_argument("--n", type=int, default=1, help="upscales of the picture, each from its own noise (default 1)")
    sampling_options(u, prompts=False)
    run_options(u, batch_size=64)
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
  judge honest confident share: the digit judge (it has a reject class) calls a sample a
        digit with p >= 0.8 (1x28x28 only; data column: the 500 held-out MNIST test digits)
  clean share of samples with a clean background (border darker than 20/255)
  rough share of samples rougher than every one of 500 data images (grain)
  swd, mmd  sliced Wasserstein distance and MMD to fresh data (2-D runs)
  prompt  a text run trained on `ddpm data shapes DIR --hold-out`: --n captions of its classes,
        one sample each, read by the exact shapes scorer: the shares right in clean, size,
        colour, shape, position and all, for seen and held-out colour-shape pairs apart
A text run's samples take one prompt each: --prompt/--prompts FILE in turn, else training
captions drawn from its data.
The same metrics of --n data points are printed beside: what a perfect model would reach
with this many samples. Extractors: 'classifier' (shipped MNIST classifier, 1x28x28 digits,
offline; on a `ddpm data shapes` folder's 3x32x32 images the shipped shapes classifier, also
'shapes') or 'inception' (the FID Inception-v3; needs --inception-weights PATH to
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
  ddpm eval runs/mnist-...                        classifier FID/KID/IS/PR of 1000 samples, drawn as the run
                                                  draws its own (its sampler, steps and guidance)
  ddpm eval runs/mnist-... --metrics fid --n 5000 --sampler ddpm --steps 250
  ddpm eval runs/cifar-... --extractor inception --inception-weights ~/pt_inception-2015-12-05-6726825d.pth
  ddpm eval runs/toy2d-...                        sliced Wasserstein and MMD
"""


def eval_parser(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate a trained run (FID/KID/IS/precision-recall, SWD/MMD, NLL)",
                        description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("run_dir", metavar="RUN_DIR", help="a folder written by `ddpm train`")
    ev.add_argument("--metrics", default="",
                    help="comma-separated list of fid, kid, is, pr, acc, judge, clean, rough, prompt (images), swd, "
                         "mmd (2-D), nll (default: fid,kid,is,pr,clean,rough for images, judge too for 1x28x28 ones, "
                         "acc for conditional runs; swd,mmd for 2-D)")
    ev.add_argument("--n", type=int, default=None,
                    help="samples to draw for the quality metrics (default 1000; a text run's: one prompt each, "
                         "prompt: one caption each); for nll the number of held-out examples (default: the whole "
                         "test split; 5000 fresh 2-D points)")
    sampling_options(ev, prompts=False)
    prompt_options(ev, negative=False)
    ev.add_argument("--extractor", default=None, choices=["classifier", "inception", "shapes"],
                    help="feature network (default: classifier, or inception when --inception-weights is given; "
                         "classifier is the shapes classifier on a `ddpm data shapes` folder's 3x32x32 images)")
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
    run_options(ev, batch_size=250)
    ev.set_defaults(func=cmd_eval, parser=ev)


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


def viz_sampling_parser(vs, name: str, help: str, description: str, n: int = 16, run_required: bool = True,
                        conditional: bool = True):
    p = vs.add_parser(name, help=help, description=description)
    p.add_argument("run_dir", metavar="RUN_DIR", nargs=None if run_required else "?", help="a run written by "
                   "`ddpm train`")
    sampling_options(p, conditional)
    p.add_argument("--n", type=int, default=n, help=f"number of samples (default {n})")
    run_options(p, batch_size=256)
    p.add_argument("--out", help="output folder (default RUN_DIR/viz)")
    p.set_defaults(parser=p)
    return p


def viz_parser(sub) -> None:
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

    r = viz_sampling_parser(vs, "reverse", "GIF and stills of x_t and the predicted x0 along sampling",
                             "Sample --n images and record --frames snapshots of x_t (left) and of the model's "
                             "prediction of x_0 (right): reverse_<sampler><steps>.gif and .png. A text run: --n "
                             "samples of each --prompt, as `ddpm sample` draws them from --seed.")
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

    ty = viz_sampling_parser(vs, "toy", "2-D data, forward diffusion and reverse process (stills and GIF)",
                              "toy_data.png, toy_forward.png; with a RUN_DIR also toy_reverse.png (samples along "
                              "the reverse process over the data in grey) and toy_diffusion.gif (forward, then "
                              "reverse).", n=2000, run_required=False, conditional=False)
    ty.add_argument("--config", default=None, help="config when no RUN_DIR (default toy2d)")
    ty.add_argument("--frames", type=int, default=25, help="reverse-process snapshots (default 25)")

    lo = vs.add_parser("loss", help="training loss curves (and eval metrics) of one or more runs",
                       description="Loss from RUN_DIR/log.csv (raw, and smoothed by an exponential moving "
                                   "average), and the metrics of RUN_DIR/eval.csv (train.eval_every) beside it.")
    lo.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="runs written by `ddpm train`")
    lo.add_argument("--smooth", type=float, default=0.8, help="EMA weight of the smoothed curve (default 0.8)")
    lo.add_argument("--out", help="output PNG or folder (default RUN_DIR/viz/loss.png of the first run)")
    lo.set_defaults(parser=lo)

    g = viz_sampling_parser(vs, "grid", "a grid of samples (fresh, or from `ddpm sample --npz`)",
                             "Sample a run and write a grid (images) or scatter plot (2-D), or draw the samples "
                             "of an .npz file written by `ddpm sample --npz`.", n=64, run_required=False)
    g.add_argument("--npz", default=None, help="samples saved by `ddpm sample --npz` instead of sampling")


def bench_parser(sub) -> None:
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
                    help="comma-separated NAME or NAME:STEP_SCHEDULE, e.g. dpmpp_2m:karras,unipc:optimized "
                         f"(default {','.join(bench.DEFAULT_SAMPLERS)})")
    bs.add_argument("--nfe", default="5,10,20,50", help="model evaluations to test (default 5,10,20,50)")
    bs.add_argument("--n", type=int, default=None, help="samples per set (default 256 for a run, 20000 analytic)")
    bs.add_argument("--reference-steps", type=int, default=1000, help="ancestral steps of the reference (default 1000)")
    run_options(bs, batch_size=256)
    bs.add_argument("--out", help="output folder")
    bs.set_defaults(func=cmd_bench, parser=bs)


