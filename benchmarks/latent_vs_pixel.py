"""Latent against pixel diffusion on the bundled digits, the same wall-clock budget for each model.

Three denoisers train one after another in one process on the same machine, each on the train split
(4,500 digits) within the same ``train.minutes`` budget (--minutes: set-up, training and the run's final
grid of --row samples; after 40 steps the measured speed fixes ``train.steps``, capped at --max-steps):

    pixel-unet    the default `ddpm train` config (configs/mnist.yaml), unconditional as the latent configs are
                  (model.num_classes=null): a 1.1M-parameter UNet on 28x28x1 pixels
    latent-unet   configs/mnist_latent.yaml: a 0.96M-parameter UNet on the 7x7x4 latents of the autoencoder
    latent-dit    the same config with model.kind=dit (Peebles & Xie 2023): patch 1 (49 tokens), width 128,
                  depth 4, 4 heads, sized so that one forward pass costs the latent UNet's multiply-adds
                  (both ~78 MFLOP per 7x7x4 latent, counted with torch's FlopCounterMode; a DiT block on T
                  tokens of width d costs ~2 T (12 d^2 + 2 T d) FLOPs, so d=128, T=49 gives ~19.5 MFLOP a block)

The latent models diffuse the latents of the autoencoder --autoencoder RUN (a `ddpm train-autoencoder`
run), or of one the script trains first (configs/mnist_autoencoder.yaml on the train split).  That
autoencoder and the one-off encoding of the digits into the latent cache are a one-off cost, reported on
their own and not charged to the latent models' budgets.

Then, outside the budgets, every model draws --n samples with the same sampler (default DDIM, 50 steps;
with --ancestral also DDPM with 250 respaced steps), timed (latents decoded to pixels included), and they
are scored against the held-out test split (500 digits) by quality_per_minute.py's scoring: with the
shipped MNIST classifier as the feature network classifier-FID, KID and the share of samples the
classifier assigns to a digit with probability >= 0.8 (it is confident on pure noise too); and, as
`ddpm eval --metrics judge,clean,rough` reports them (ddpmlab.evaluate.judges.digit_quality), the honest
confident share of the digit judge (which has a reject class) and its ratio to the real test digits'
share, the clean-background share and the rough share (the real test digits' row beside).  Prints a
markdown table and writes it, the numbers (JSON) and one labelled row of samples per model, same seeds
(PNG), to --out.

    python benchmarks/latent_vs_pixel.py                                   # 10 min per model, 1,000 samples
    python benchmarks/latent_vs_pixel.py --autoencoder runs/mnist-autoencoder --minutes 5 --ancestral
    python benchmarks/latent_vs_pixel.py --dit dit.depth=6 train.lr=5e-4   # another DiT recipe
    python benchmarks/latent_vs_pixel.py --half     # + the latent models at half the budget ("-half" rows)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_per_minute import QUALITY_HEAD, cpu_name, quality_cells, real_scores, score

from ddpmlab.config import load_config
from ddpmlab.cli.options import NAMES
from ddpmlab.errors import DDPMError, OptionError
from ddpmlab.evaluate.features import classifier_extractor
from ddpmlab.evaluate.metrics import check_fid_samples
from ddpmlab.io.checkpoint import load_run_config
from ddpmlab.io.images import grid_image
from ddpmlab.models import count_parameters
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request, resolve_device
from ddpmlab.samplers.registry import get_sampler
from ddpmlab.training.tasks.autoencoder import train_autoencoder
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.precision import cpu_flags
from ddpmlab.training.data import latent_dataset, load_data

# the latent DiT: patch 1 on 7x7 latents (49 tokens), ~ the latent UNet's FLOPs per forward pass
DIT = ["model.kind=dit", "dit.preset=null", "dit.patch_size=1", "dit.hidden=128", "dit.depth=4",
       "dit.heads=4"]
MODELS = {  # name: (bundled config, its overrides before the user's)
    "pixel-unet": ("mnist", ["model.num_classes=null"]),  # unconditional, as the latent configs are
    "latent-unet": ("mnist_latent", []),
    "latent-dit": ("mnist_latent", DIT),
}
LATENT = [name for name, (base, _) in MODELS.items() if base != "mnist"]  # the models --half trains again


def machine_line(device: torch.device) -> str:
    flags = cpu_flags() or set()
    line = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
            "flags: " + ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags))
    if device.type == "cuda":
        line += f"; GPU: {torch.cuda.get_device_name(device)}"
    return line


class _OneProcess:
    """What :func:`latent_dataset` needs of an Accelerator, to fill the latent cache before any budget starts."""

    def __init__(self, device: torch.device):
        self.device = device

    def main_process_first(self):
        return contextlib.nullcontext()


def get_autoencoder(args, out: Path, device: torch.device, progress: bool) -> dict:
    """The autoencoder run the latent models diffuse: --autoencoder, or one trained now (timed)."""
    if args.autoencoder:
        path = Path(args.autoencoder)
        cfg = load_run_config(path)
        if cfg.stage != "autoencoder":
            raise SystemExit(f"--autoencoder {path}: not an autoencoder run (stage {cfg.stage}); give a folder "
                             "written by `ddpm train-autoencoder`, or leave --autoencoder out to train one")
        if cfg.data.split != "train":
            print(f"note: the autoencoder {path} trained on data.split={cfg.data.split}, which includes the test "
                  "digits the samples are scored against; train one on data.split=train for a clean comparison")
        info = {"path": str(path), "trained_here": False, "seconds": None}
    else:
        cfg = load_config("mnist_autoencoder", ["data.split=train", f"train.out_dir={out}", "train.name=autoencoder",
                                                f"train.seed={args.seed}", "train.tensorboard=false",
                                                f"train.device={args.device}", *args.ae])
        t0 = time.perf_counter()
        path = train_autoencoder(cfg, progress=progress)
        info = {"path": str(path), "trained_here": True, "seconds": round(time.perf_counter() - t0, 1)}
    stats = json.loads((path / "autoencoder.json").read_text())
    info.update(steps=cfg.train.steps, psnr_db=stats["psnr_db"], latent_shape=stats["latent_shape"],
                scale_factor=stats["scale_factor"])
    return info


def diffusion_config(name: str, args, out: Path, autoencoder: str, minutes: Optional[float] = None,
                     run_name: Optional[str] = None):
    """The config of one model: its bundled config, the benchmark's budget (``minutes``, default --minutes)
    and final grid, then the user's keys; the run folder out/``run_name`` (default ``name``)."""
    base, fixed = MODELS[name]
    latent = [f"model.autoencoder={autoencoder}"] if base != "mnist" else []
    user = {"pixel-unet": args.pixel, "latent-unet": args.unet, "latent-dit": args.dit}[name]
    minutes = args.minutes if minutes is None else minutes
    return load_config(base, [*latent, *fixed, "data.split=train", f"train.minutes={minutes}",
                              f"train.steps={args.max_steps}", "train.sample_every=0", "train.eval_every=0",
                              f"train.sample_n={args.row}", f"train.sample_sampler={args.sampler}",
                              f"train.sample_steps={args.steps}", f"train.seed={args.seed}",
                              "train.tensorboard=false", f"train.device={args.device}", f"train.out_dir={out}",
                              f"train.name={run_name or name}", *user])


def fill_latent_cache(cfg, device: torch.device) -> float:
    """Encode the train digits into the latent cache once (seconds), so no latent model's budget pays for it."""
    t0 = time.perf_counter()
    latent_dataset(cfg, load_data(cfg), _OneProcess(device), True, False)
    return time.perf_counter() - t0


def read_log(run_dir: Path, batch_size: int) -> dict:
    """Steps done and training images/s from RUN/log.csv (median of its rows' it/s, the first row's warm-up left out)."""
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"{run_dir}/log.csv has no rows: the run did not log a step (train.log_every too large?)")
    rates = [float(r["it_per_s"]) for r in (rows[1:] or rows)]
    steps_per_s = statistics.median(rates)
    return {"steps": int(rows[-1]["step"]), "steps_per_s": steps_per_s, "images_per_s": steps_per_s * batch_size,
            "train_s": float(rows[-1]["time_s"])}


def forward_flops(model: torch.nn.Module, shape: tuple, device: torch.device) -> int:
    """FLOPs of one forward pass on one sample (matrix products and convolutions, torch's FlopCounterMode)."""
    x = torch.randn((1, *shape), device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, torch.tensor([500], device=device))
    return int(counter.get_total_flops())


def timed_samples(run, sampler: str, steps: int, n: int, seed: int, progress: bool) -> tuple:
    """(n samples in pixels, seconds per sample): draw_samples after a two-step warm-up call."""
    warm = plan_request(run, SamplingRequest(sampler, 2, n=min(n, 8), cycle_classes=False), log=lambda m: None)
    draw_samples(run, warm, min(n, 8), seed=seed, progress=False)
    plan = plan_request(run, SamplingRequest(sampler, steps, n=n, cycle_classes=False), log=lambda m: None)
    t0 = time.perf_counter()
    x = draw_samples(run, plan, n, seed=seed, progress=progress)
    return x, (time.perf_counter() - t0) / n


def rows_png(rows: dict, path: Path, scale: int = 2) -> Path:
    """One labelled row of samples per model (the same seeds)."""
    images = {name: grid_image(x, nrow=len(x), scale=scale).convert("L") for name, x in rows.items()}
    font = ImageFont.load_default()
    label_w, pad = 110, 6
    width = label_w + max(i.width for i in images.values())
    canvas = Image.new("L", (width, sum(i.height + pad for i in images.values()) + pad), 255)
    draw, top = ImageDraw.Draw(canvas), pad
    for name, img in images.items():
        draw.text((6, top + img.height // 2 - 6), name, fill=0, font=font)
        canvas.paste(img, (label_w, top))
        top += img.height + pad
    canvas.save(path)
    return path


def _overrides(p: argparse.ArgumentParser, flag: str, what: str) -> None:
    p.add_argument(flag, nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"config overrides of {what} (after the benchmark's own keys)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each model (default 10)")
    p.add_argument("--max-steps", type=int, default=200000, help="train.steps: the cap the budget fits under")
    p.add_argument("--n", type=int, default=1000, help="samples drawn, timed and scored per model (default 1000)")
    p.add_argument("--sampler", default="ddim", help="sampler of the timing and scores, the same for all (ddim)")
    p.add_argument("--steps", type=int, default=50, help="its steps (default 50)")
    p.add_argument("--ancestral", action="store_true", help="also time and score DDPM with 250 steps")
    p.add_argument("--half", action="store_true",
                   help="also train each latent model with half the budget: does it reach the pixel UNet's score?")
    p.add_argument("--autoencoder", metavar="RUN", help="reuse this autoencoder run (default: train one first)")
    p.add_argument("--row", type=int, default=10, help="samples per model in the PNG row (default 10)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--out", default="runs/latent-vs-pixel", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _overrides(p, "--pixel", "the pixel UNet (configs/mnist.yaml)")
    _overrides(p, "--unet", "the latent UNet (configs/mnist_latent.yaml)")
    _overrides(p, "--dit", "the latent DiT (mnist_latent + model.kind=dit, patch 1, width 128, depth 4, 4 heads)")
    _overrides(p, "--ae", "the autoencoder trained first (configs/mnist_autoencoder.yaml), e.g. train.steps=600")
    args = p.parse_args(argv)
    if (args.sampler, args.steps) == ("ddpm", 250):
        args.ancestral = False  # the second column would repeat the first
    out = Path(args.out)
    names = [*MODELS, *([f"{n}-half" for n in LATENT] if args.half else []),
             *([] if args.autoencoder else ["autoencoder"])]
    taken = [name for name in names if (out / name).exists()]
    if taken:
        raise SystemExit(f"{out} already holds {', '.join(taken)}: give another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)  # a bad name: an OptionError, printed as `ddpm` prints it
    extractor = classifier_extractor(device)
    check_fid_samples(args.n, extractor.num_features)  # before the trainings, not after
    get_sampler(args.sampler)
    progress = not args.no_progress
    machine = machine_line(device)
    print(machine)

    ae_path = Path(args.autoencoder) if args.autoencoder else out / "autoencoder"
    configs = {name: diffusion_config(name, args, out, str(ae_path)) for name in MODELS}  # bad keys fail now
    if args.half:  # the latent models again at half the budget
        configs.update({f"{name}-half": diffusion_config(name, args, out, str(ae_path), args.minutes / 2,
                                                         f"{name}-half") for name in LATENT})
    ae = get_autoencoder(args, out, device, progress)
    for cfg in configs.values():  # where it really went (--ae may rename it)
        cfg.model.autoencoder = ae["path"] if cfg.model.autoencoder else None
    ae["encode_s"] = round(fill_latent_cache(configs["latent-unet"], device), 1)
    results = {}
    for name, cfg in configs.items():
        print(f"== {name}: {cfg.train.minutes:g} min")
        t0 = time.perf_counter()
        run_dir = train(cfg, progress=progress)
        wall = time.perf_counter() - t0
        results[name] = {"run": str(run_dir), "wall_s": round(wall, 1),
                         "batch_size": cfg.train.batch_size, **read_log(run_dir, cfg.train.batch_size)}

    real, real_feats, real_row = real_scores(extractor)
    real_share = real_row["confident"]
    samplers = [(args.sampler, args.steps)] + ([("ddpm", 250)] if args.ancestral else [])
    rows = {}
    for name, r in results.items():
        run = load_run(r["run"], "ema", device)
        r.update(params=count_parameters(run.model), mflop=forward_flops(run.model, run.shape, device) / 1e6,
                 shape=list(run.shape))
        for sampler, steps in samplers:
            x, per = timed_samples(run, sampler, steps, args.n, 1000 + args.seed, progress)
            r[f"{sampler}{steps}"] = {"s_per_sample": per, **score(x, extractor, real_feats, real)}
            rows.setdefault(name, x[:args.row])

    first = f"{args.sampler}{args.steps}"
    shape_of = {name: r["shape"] for name, r in results.items()}
    numbers = {name: int(torch.tensor(s).prod()) for name, s in shape_of.items()}
    u, pu, d = results["latent-unet"], results["pixel-unet"], results["latent-dit"]
    c, h, w = shape_of["latent-unet"]
    note = (f"Note: on 28x28 digits the latent is {h}x{w}x{c} = {numbers['latent-unet']} numbers against "
            f"{numbers['pixel-unet']} pixels ({numbers['pixel-unet'] / numbers['latent-unet']:.0f}x fewer). Measured "
            f"per training step: the latent UNet ran {u['steps_per_s'] / pu['steps_per_s']:.2f}x as fast as the pixel "
            f"UNet ({u['steps_per_s']:.2f} vs {pu['steps_per_s']:.2f} steps/s), the latent DiT "
            f"{d['steps_per_s'] / pu['steps_per_s']:.2f}x ({d['steps_per_s']:.2f} steps/s; "
            f"{d['steps_per_s'] / u['steps_per_s']:.2f}x the latent UNet's at {d['mflop'] / u['mflop']:.2f}x its "
            f"forward FLOPs).")
    if ae["trained_here"]:
        one_off = (f"autoencoder trained here ({ae['steps']} steps, {ae['seconds']:.0f} s, "
                   f"not part of any budget)")
    else:
        one_off = f"autoencoder reused from {ae['path']}"
    lines = [f"Machine: {machine}.", "",
             (f"Budget {args.minutes:g} min per model{' (-half: half of it)' if args.half else ''} (train.minutes: "
              f"set-up, training, a final grid of {args.row}); "
             f"{one_off}; held-out reconstruction PSNR {ae['psnr_db']:.2f} dB; the latent cache of the train digits "
             f"filled (or read) in {ae['encode_s']:.0f} s, once, before the budgets. {args.n} samples each, "
             f"{args.sampler} {args.steps} steps, scored against the {len(real)} held-out test digits (shipped "
             "classifier's features; the digit judge)."), "",
             "| model | params | MFLOP / forward | steps done | train img/s | wall clock | "
             f"s / sample ({args.sampler} {args.steps})"
             + (" | s / sample (ddpm 250)" if args.ancestral else "")
             + f" | classifier-FID | KID | confident share (p >= 0.8) | share / real | {QUALITY_HEAD} |",
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.ancestral else "") + "---:|" * 8]
    for name, r in results.items():
        m, s = divmod(r["wall_s"], 60)
        q = r[first]
        lines.append(f"| {name} ({'x'.join(map(str, r['shape']))}) | {r['params'] / 1e6:.2f}M | {r['mflop']:.1f} | "
                     f"{r['steps']} of batch {r['batch_size']} | {r['images_per_s']:.0f} | {int(m)} min {s:.0f} s | "
                     f"{q['s_per_sample'] * 1e3:.1f} ms"
                     + (f" | {r['ddpm250']['s_per_sample'] * 1e3:.1f} ms" if args.ancestral else "")
                     + f" | {q['fid']:.2f} | {q['kid']:.4f} | {q['confident']:.1%} | "
                     f"{q['confident'] / real_share:.2f} | {quality_cells(q)} |")
    lines.append("| real test digits | | | | | | " + ("| " if args.ancestral else "")
                 + f"| | | {real_share:.1%} | 1.00 | {quality_cells(real_row)} |")
    if args.ancestral:
        lines += ["", "The same models with DDPM, 250 respaced steps (the same seeds):", "",
                  f"| model | classifier-FID | KID | confident share (p >= 0.8) | {QUALITY_HEAD} |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {name} | {r['ddpm250']['fid']:.2f} | {r['ddpm250']['kid']:.4f} | "
                  f"{r['ddpm250']['confident']:.1%} | {quality_cells(r['ddpm250'])} |" for name, r in results.items()]
    lines += ["", note]
    if args.half:
        want = pu[first]["fid"]
        for name in (n for n in results if n.endswith("-half")):
            got = results[name][first]["fid"]
            lines.append(f"With half the budget ({args.minutes / 2:g} min) {name[:-5]} reaches classifier-FID "
                         f"{got:.2f}: {'at or below' if got <= want else 'above'} the pixel UNet's {want:.2f} "
                         f"with the full {args.minutes:g} min.")
    table = "\n".join(lines)
    print(table)
    (out / "latent_vs_pixel.md").write_text(table + "\n")
    (out / "latent_vs_pixel.json").write_text(json.dumps(
        {"machine": machine, "args": vars(args), "autoencoder": ae, "real_confident": real_share, "real": real_row,
         "dit": DIT, "results": results, "note": note}, indent=1))
    png = rows_png(rows, out / "latent_vs_pixel.png")
    print(f"wrote {out / 'latent_vs_pixel.md'}, {out / 'latent_vs_pixel.json'} and {png} "
          f"(rows top to bottom: {', '.join(rows)}; {args.sampler} {args.steps}, seed {1000 + args.seed})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DDPMError as e:  # a bad option or override: its one-line message, as `ddpm` prints it
        sys.exit(f"error: {e.named(NAMES) if isinstance(e, OptionError) else e}")
