"""What a training budget buys: the quality of one recipe after 100 ... 3,000 training steps.

One run of the recipe (default: the bundled `ddpm train` config) is trained in stages, each stage
resumed from the last (the learning rate is constant after warm-up and every step is seeded by
(seed, step), so the run at step k is exactly a k-step run), and evaluated after each with
`ddpm eval` as a user would run it: the run's own sampler, steps and guidance, --n samples against
the data.  The metrics are those `ddpm eval` gives the run (digits: classifier-FID, class accuracy,
the judge's honest confident share, clean and rough shares).  Prints a markdown table with the
seconds each stage took on this CPU and writes it, the numbers (JSON) and a plot to --out.

    python benchmarks/quality_vs_steps.py                              # mnist, 100..3000 steps
    python benchmarks/quality_vs_steps.py --steps 100,500 --n 200 --config mnist_ddpm
    python benchmarks/quality_vs_steps.py train.seed=1                 # another seed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ORDER = ["fid", "acc", "judge", "judge_vs_real", "clean", "rough", "swd", "mmd"]


def ddpm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddpmlab", *args], check=True)


def newest_run(parent: Path, before: set) -> Path:
    new = [p for p in parent.iterdir() if p.is_dir() and p not in before]
    if len(new) != 1:
        raise SystemExit(f"expected one new run folder in {parent}, found {len(new)}")
    return new[0]


def evaluate(run: Path, n: int, metrics: str) -> dict:
    args = ["eval", str(run), "--n", str(n), "--no-progress"]
    if metrics:
        args += ["--metrics", metrics]
    ddpm(*args)
    found = sorted((run / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime)
    result = json.loads(found[-1].read_text())
    return result


def flat(result: dict) -> dict:
    """The numbers of an eval JSON as {metric: value} (the model's, not the data's)."""
    values = result.get("metrics", result)
    return {k: v for k, v in values.items() if isinstance(v, (int, float))}


def table(rows: list) -> str:
    keys = [k for k in ORDER if any(k in r for r in rows)]
    head = "| steps | training s | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for r in rows:
        cells = [f"{r[k]:.3g}" if k in r else "" for k in keys]
        lines.append(f"| {r['steps']} | {r['seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list, out: Path) -> None:
    keys = [k for k in ("fid", "acc", "judge", "clean") if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, k in zip(list(axes) if len(keys) > 1 else [axes], keys):
        ax.plot([r["steps"] for r in rows], [r.get(k) for r in rows], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("training steps (batch 64)")
        ax.set_title(k)
        if k == "fid":
            ax.set_yscale("log")
        else:
            ax.set_ylim(0, 1.05)  # shares: the whole range, so a flat line at 1 reads as what it is
    fig.tight_layout()
    fig.savefig(out / "quality_vs_steps.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="mnist")
    ap.add_argument("--steps", default="100,200,500,1000,2000,3000")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--metrics", default="", help="ddpm eval --metrics (default: the run's own)")
    ap.add_argument("--out", default="runs/quality_vs_steps")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot of --out's quality_vs_steps.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out = Path(args.out)
    if args.plot_only:
        return plot(json.loads((out / "quality_vs_steps.json").read_text()), out)
    out.mkdir(parents=True, exist_ok=True)
    parent = out / "run"
    parent.mkdir(exist_ok=True)
    rows, run = [], None
    for k in [int(s) for s in args.steps.split(",")]:
        start = time.perf_counter()
        common = ["train.minutes=null", f"train.steps={k}", "--no-progress"]
        if run is None:
            before = set(parent.iterdir())
            ddpm("train", "--config", args.config, f"train.out_dir={parent}", *common, *args.overrides)
            run = newest_run(parent, before)
        else:
            ddpm("train", "--resume", str(run), *common)
        seconds = time.perf_counter() - start
        row = {"steps": k, "seconds": seconds, **flat(evaluate(run, args.n, args.metrics))}
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "quality_vs_steps.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    print(text)
    (out / "quality_vs_steps.md").write_text(text + "\n")
    plot(rows, out)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
