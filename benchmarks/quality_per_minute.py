"""Quality per CPU-minute: the default `ddpm train` recipe against a plain diffusers recipe.

Both train on the bundled MNIST digits (the train split, 4,500 images) on the same machine in
one run, each within the same wall-clock budget (training and its final 64 samples together):

    ddpmlab     `ddpm train` with the bundled default config (configs/mnist.yaml): its own steps,
                precision (auto), schedule and final sampler, timed as a user would see it; the
                default is class-conditional (the digits' labels) and samples with classifier-free
                guidance over the ten classes in turn (model.num_classes=null: unconditional)
    diffusers   the recipe of diffusers' train_unconditional.py example: UNet2DModel of the same
                architecture, DDPMScheduler (linear betas, T=1000), AdamW 1e-4 with 500 warm-up
                steps and cosine decay, EMAModel (power 3/4), fp32, batch 64; trained until the
                budget minus its sampling time is spent, then DDIM with 50 steps

Then, outside the budget, --n samples of each are scored against the held-out test split (500
digits) with the shipped MNIST classifier as the feature network: classifier-FID, KID, and the
share of samples the classifier assigns to a digit with probability >= 0.8 (the classifier is
confident on pure noise too: read it only beside the rest); and by
ddpmlab.evaluate.judges.digit_quality, as `ddpm eval --metrics judge,clean,rough` reports them:
the honest confident share (the digit judge, which has a reject class, calls a sample a digit with
p >= 0.8) and its ratio to the real test digits' share, the clean-background share (border darker
than 20/255) and the rough share (rougher than every real test digit).  The real test digits' row
stands beside.  Prints a markdown table and writes it, the numbers (JSON) and the two sample grids
side by side (PNG) to --out.  `score`, `real_scores` and `quality_cells` are the scoring the other
digit benchmarks import.

    python benchmarks/quality_per_minute.py                 # 10-minute budget, 1,000 samples each
    python benchmarks/quality_per_minute.py --minutes 5 --n 500
    python benchmarks/quality_per_minute.py train.steps=600 train.lr_schedule=cosine   # another recipe
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.config import load_config
from ddpmlab.data import load_mnist
from ddpmlab.evaluate.features import batches, classifier_extractor, extract
from ddpmlab.evaluate.judges import digit_quality
from ddpmlab.evaluate.metrics import feature_sums, fid, kid
from ddpmlab.io.diffusers_bridge import require_diffusers, unet2d_config
from ddpmlab.io.images import grid_image
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.precision import cpu_flags

CONFIDENT = 0.8


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ddpmlab_recipe(out: Path, seed: int, overrides=()):
    """Train the default config (with ``overrides``) on the train split; (sample function, seconds, note)."""
    cfg = load_config("mnist", [*overrides, f"train.out_dir={out}", "train.name=ddpmlab", "data.split=train",
                                f"train.seed={seed}", "train.tensorboard=false"])
    t0 = time.perf_counter()
    train(cfg, progress=False)
    seconds = time.perf_counter() - t0
    run = load_run(out / "ddpmlab", "ema", "cpu")
    t = cfg.train

    def sample(n: int, sample_seed: int) -> torch.Tensor:
        plan = plan_request(run, SamplingRequest(t.sample_sampler, t.sample_steps, n=n, cycle_classes=False),
                            log=lambda m: None)
        return draw_samples(run, plan, n, seed=sample_seed, progress=False)

    guide = f", guidance {t.sample_guidance:g}" if cfg.model.num_classes and t.sample_guidance is not None else ""
    labels = "class-conditional, " if cfg.model.num_classes else ""
    note = f"{labels}{t.steps} steps of batch {t.batch_size}, then {t.sample_sampler} {t.sample_steps} steps{guide}"
    return sample, seconds, note


def diffusers_recipe(budget_s: float, seed: int):
    """train_unconditional.py's recipe within budget_s (training + 64 final DDIM-50 samples)."""
    diffusers = require_diffusers()
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    cfg = load_config("mnist", ["model.num_classes=null"])  # train_unconditional.py: no labels
    unet = diffusers.UNet2DModel(**unet2d_config(cfg))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    x, _ = load_mnist("train")
    batch = 64
    t0 = time.perf_counter()
    deadline = budget_s - _ddim_cost(unet, 64)
    g = torch.Generator().manual_seed(seed)

    def step_once(model, optimizer) -> None:
        idx = torch.randint(0, len(x), (batch,), generator=g)
        x0 = x[idx]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (batch,), generator=g)
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # the cosine schedule needs the run's length: three steps on a copy say how many the budget buys
    probe = copy.deepcopy(unet)
    probe_opt = torch.optim.AdamW(probe.parameters(), lr=1e-4)
    t1 = time.perf_counter()
    for _ in range(3):
        step_once(probe, probe_opt)
    per_step = (time.perf_counter() - t1) / 3
    max_steps = max(int((deadline - (time.perf_counter() - t0)) / per_step), 1)
    lr_sched = get_cosine_schedule_with_warmup(opt, 500, max_steps)
    step = 0
    while time.perf_counter() - t0 < deadline:
        step_once(unet, opt)
        lr_sched.step()
        ema.step(unet.parameters())
        step += 1
    ema.copy_to(unet.parameters())
    unet.eval()
    _ddim(unet, 64, seed)  # the run's final samples, inside the budget
    seconds = time.perf_counter() - t0

    def sample(n: int, sample_seed: int) -> torch.Tensor:
        return torch.cat([_ddim(unet, min(256, n - i), sample_seed + i) for i in range(0, n, 256)])

    return sample, seconds, f"{step} steps of batch {batch}, then DDIM 50 steps"


@torch.no_grad()
def _ddim(unet, n: int, seed: int, steps: int = 50) -> torch.Tensor:
    diffusers = require_diffusers()
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    sched.set_timesteps(steps)
    x = torch.randn((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x).prev_sample
    return x.clamp(-1, 1)


def _ddim_cost(unet, n: int) -> float:
    """Seconds DDIM-50 on n samples will take (two steps timed)."""
    x = torch.randn((n, 1, 28, 28))
    with torch.no_grad():
        unet(x, torch.tensor(500))
        t0 = time.perf_counter()
        for _ in range(2):
            unet(x, torch.tensor(500))
    return (time.perf_counter() - t0) / 2 * 50 * 1.1


def confident_share(logits: torch.Tensor) -> float:
    """The share the shipped classifier assigns to a digit with probability >= 0.8 (pure noise included)."""
    return float((logits.softmax(1).max(1).values >= CONFIDENT).float().mean())


def score(x: torch.Tensor, extractor, real_features: torch.Tensor, real: Optional[torch.Tensor] = None) -> dict:
    """x: (N, 1, 28, 28) samples -> classifier-FID, KID and confident share against the real digits' features;
    with ``real`` (the real digits, (M, 1, 28, 28)) also digit_quality's judge, judge_vs_real, clean and rough."""
    feats, logits = extract(extractor, batches(x, 500), total=len(x), with_logits=True, progress=False)
    k = kid(real_features, feats, subset_size=min(len(feats), len(real_features)))
    out = {"fid": fid(feature_sums(real_features), feats), "kid": k[0], "confident": confident_share(logits)}
    return out if real is None else {**out, **digit_quality(x, real)}


def real_scores(extractor, real: Optional[torch.Tensor] = None) -> tuple:
    """(real digits, their classifier features, their row of the table): ``real`` or the 500 held-out test digits;
    the row holds their confident share and digit_quality against themselves (judge_vs_real 1, rough 0)."""
    real = load_mnist("test")[0] if real is None else real
    feats, logits = extract(extractor, batches(real, 500), total=len(real), with_logits=True, progress=False)
    return real, feats, {"confident": confident_share(logits), **digit_quality(real, real)}


QUALITY_HEAD = "judge: honest share (p >= 0.8) | judge / real | clean | rough"  # quality_cells' columns


def quality_cells(r: dict) -> str:
    """The table cells of digit_quality's measures in ``r``, in QUALITY_HEAD's order."""
    return f"{r['judge']:.1%} | {r['judge_vs_real']:.2f} | {r['clean']:.1%} | {r['rough']:.1%}"


def side_by_side(grids, path: Path) -> Path:
    images = [grid_image(x[:64], nrow=8, scale=2) for x in grids]
    pad = 16
    canvas = Image.new("L", (sum(i.width for i in images) + pad * (len(images) - 1), images[0].height), 255)
    left = 0
    for img in images:
        canvas.paste(img.convert("L"), (left, 0))
        left += img.width + pad
    canvas.save(path)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget of each recipe (default 10)")
    p.add_argument("--n", type=int, default=1000, help="samples scored per recipe (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/quality-per-minute", help="output folder")
    p.add_argument("--skip-diffusers", action="store_true", help="only the ddpmlab recipe")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides of the ddpmlab recipe, e.g. train.steps=600 (default: none)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "ddpmlab").exists():
        raise SystemExit(f"{out}/ddpmlab exists: give another --out")
    out.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags() or set()
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; flags: "
               + ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags))
    print(machine)
    recipes = {"ddpmlab": ddpmlab_recipe(out, args.seed, args.overrides)}
    if not args.skip_diffusers:
        recipes["diffusers"] = diffusers_recipe(args.minutes * 60, args.seed)
    extractor = classifier_extractor("cpu")
    real, real_feats, real_row = real_scores(extractor)
    results, grids = {}, []
    for name, (sample, seconds, note) in recipes.items():
        x = sample(args.n, 1000 + args.seed)
        grids.append(x)
        results[name] = {"seconds": round(seconds, 1), "recipe": note, **score(x, extractor, real_feats, real)}
    lines = [f"Machine: {machine}. Budget {args.minutes:g} min per recipe; {args.n} samples each scored "
             f"against the {len(real)} held-out test digits (shipped classifier's features; the digit judge).", "",
             "| recipe | wall clock | classifier-FID | KID | confident share (p >= 0.8) | share / real | "
             f"{QUALITY_HEAD} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        m, s = divmod(r["seconds"], 60)
        lines.append(f"| {name}: {r['recipe']} | {int(m)} min {s:.0f} s | {r['fid']:.2f} | {r['kid']:.4f} | "
                     f"{r['confident']:.1%} | {r['confident'] / real_row['confident']:.2f} | {quality_cells(r)} |")
    lines.append(f"| real test digits | | | | {real_row['confident']:.1%} | 1.00 | {quality_cells(real_row)} |")
    table = "\n".join(lines)
    print(table)
    (out / "quality_per_minute.md").write_text(table + "\n")
    (out / "quality_per_minute.json").write_text(json.dumps(
        {"machine": machine, "minutes": args.minutes, "n": args.n, "real_confident": real_row["confident"],
         "real": real_row, "results": results}, indent=1))
    print(f"wrote {side_by_side(grids, out / 'quality_per_minute.png')} (left to right: {', '.join(results)})")
    if "diffusers" in results and not math.isnan(results["diffusers"]["fid"]):
        print(f"FID ratio ddpmlab / diffusers: {results['ddpmlab']['fid'] / results['diffusers']['fid']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
