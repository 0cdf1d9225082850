"""Colour images on black: does a short run learn a clean black background and the right shape and colour?

Writes a class folder of coloured shapes on pure black (`ddpm data shapes`: by default 6,000 images of
32x32, 108 classes = 2 sizes x 6 colours x 3 shapes x 3 positions), trains a class-conditional run on
it with each given recipe (default: the bundled `mnist` recipe, flow matching, and `mnist_ddpm`, the
same on DDPM; the UNet's attention moves to the 8x8 level) for the same number of training steps
(default 742: what 20 minutes buy a 2-core AVX2 CPU at this size), then draws --n samples of each as
the run draws its own (the classes in turn, its sampler, steps and guidance) and scores them twice:

    shapes  the exact scorer of the set (ddpmlab.evaluate.shapes): clean background (every pixel
            away from the shape darker than 20/255), right size, colour, shape and position, all
    eval    `ddpm eval RUN --metrics clean,rough` (the border rule and the grain rule of the judges)

Prints a markdown table, writes it, the numbers (JSON) and each run's sample grid to --out.

    python benchmarks/shapes_colour.py
    python benchmarks/shapes_colour.py --configs mnist --steps 300 --n 216
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.data.shapes import parse_class_name  # noqa: E402
from ddpmlab.evaluate.shapes import score_shapes, shape_shares  # noqa: E402
from ddpmlab.io.images import save_grid  # noqa: E402
from ddpmlab.runs import SamplingRequest, draw_samples, load_class_names, load_run, plan_request  # noqa: E402

FOLDER_ARGS = ["--shapes", "circle,square,triangle", "--positions", "left,centre,right"]
RUN_ARGS = ["data.dataset=folder", "data.image_size=32", "data.channels=3", "unet.attention_resolutions=[8]",
            "train.minutes=null", "train.mixed_precision=no", "--no-progress"]


def ddpm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddpmlab", *args], check=True)


def score(run_dir: Path, n: int, out: Path) -> dict:
    run = load_run(run_dir, device="cpu")
    plan = plan_request(run, SamplingRequest(n=n, seed=0))
    x = draw_samples(run, plan, progress=False)
    names = load_class_names(run_dir)
    targets = [parse_class_name(names[i % len(names)]) for i in range(n)]
    save_grid(x[:96], out / f"{run_dir.name}.png", nrow=12)
    shares = shape_shares(score_shapes(x, targets))
    return {"sampling": plan.describe(), **{f"shapes_{k}": v for k, v in shares.items()}}


def eval_shares(run_dir: Path, n: int) -> dict:
    ddpm("eval", str(run_dir), "--metrics", "clean,rough", "--n", str(n), "--no-progress")
    found = sorted((run_dir / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(found[-1].read_text())
    return {f"eval_{k}": v for k, v in result["metrics"].items()} | \
        {f"data_{k}": v for k, v in (result.get("data_baseline") or {}).items()}


def table(rows: list) -> str:
    keys = ["shapes_clean", "shapes_colour", "shapes_shape", "shapes_size", "shapes_position", "shapes_all",
            "eval_clean", "eval_rough"]
    lines = ["| recipe | training steps | training s | " + " | ".join(k.replace("_", " ") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 3)]
    for r in rows:
        lines.append(f"| `{r['config']}` | {r['steps']} | {r['seconds']:.0f} | "
                     + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="mnist,mnist_ddpm")
    ap.add_argument("--steps", type=int, default=742)
    ap.add_argument("--images", type=int, default=6000)
    ap.add_argument("--n", type=int, default=432, help="samples per run (the classes in turn)")
    ap.add_argument("--out", default="runs/shapes_colour")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    if not data.exists():
        ddpm("data", "shapes", str(data), "--n", str(args.images), "--no-progress", *FOLDER_ARGS)
    classes = len([d for d in data.iterdir() if d.is_dir()])
    rows = []
    for name in args.configs.split(","):
        run_dir = out / f"run-{name}"
        start = time.perf_counter()
        if not (run_dir / "checkpoints").exists():
            ddpm("train", "--config", name, f"data.path={data}", f"train.out_dir={out}", f"train.name=run-{name}",
                 f"train.steps={args.steps}", f"model.num_classes={classes}", *RUN_ARGS, *args.overrides)
        row = {"config": name, "steps": args.steps, "seconds": time.perf_counter() - start,
               **score(run_dir, args.n, out), **eval_shares(run_dir, args.n)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "shapes_colour.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    print(text)
    (out / "shapes_colour.md").write_text(text + "\n")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
