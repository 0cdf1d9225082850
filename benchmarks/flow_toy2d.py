"""Flow matching against DDPM on 2-D data, and reflow against the consistency student of the same teacher.

One script, one CPU, every run trained here:

    ddpm        `--config toy2d` (eps prediction, linear betas, T = 1000)
    flow        the same MLP, data and training steps with diffusion.process=flow (velocity)
    reflow      `ddpm reflow FLOW --pairs P`: the flow teacher's Euler-100 (noise, sample) pairs,
                the straight path learned from the teacher's weights (Liu et al. 2023)
    consistency `ddpm distill FLOW --method consistency`: Song et al. 2023's student of the teacher

Each is scored with `ddpm eval RUN --metrics swd,mmd` (sliced Wasserstein distance and MMD^2 of
--n samples to fresh data; the data's own row beside) at several sampling steps: DDPM with DDIM
(its Euler), DPM-Solver++(2M) and its own ancestral sampler, the flow with flow Euler and
DPM-Solver++(2M), the students at 1 and 2 steps (Euler's 2 steps on the trailing grid 1, 1/2, 0: the
flow grid of diffusers' FlowMatchEulerDiscreteScheduler spends its second step from 1/T to 0).  Prints a markdown table and writes it and the
numbers (JSON) to --out.

    python benchmarks/flow_toy2d.py
    python benchmarks/flow_toy2d.py --toy moons --train-steps 1000 --pairs 5000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity", "train.sample_sampler=null",
        "train.sample_steps=100"]


def ddpm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddpmlab", *args, "--no-progress"], check=True)


def evaluate(run: Path, n: int, *sampling: str) -> dict:
    out = run / "eval" / f"bench_{'_'.join(s.strip('-') for s in sampling) or 'own'}.json"
    ddpm("eval", str(run), "--metrics", "swd,mmd", "--n", str(n), "--out", str(out), *sampling)
    result = json.loads(out.read_text())
    return {"swd": result["metrics"]["swd"], "mmd": result["metrics"]["mmd"],
            "data_swd": result["data_baseline"]["swd"], "data_mmd": result["data_baseline"]["mmd"],
            "sampling": f"{result['settings']['sampler']} {result['settings']['steps']}"}


def one_folder(parent: Path, before: set) -> Path:
    new = [p for p in parent.iterdir() if p.is_dir() and p not in before]
    if len(new) != 1:
        raise SystemExit(f"expected one new run folder in {parent}, found {[p.name for p in new]}")
    return new[0]


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def train_pair(out: Path, args) -> dict:
    runs = {}
    for name, extra in (("ddpm", []), ("flow", FLOW)):
        if not (out / name / "checkpoints").exists():
            _, s = timed(ddpm, "train", "--config", "toy2d", f"data.toy={args.toy}", f"train.steps={args.train_steps}",
                         f"train.out_dir={out}", f"train.name={name}", "train.minutes=null", *extra)
            print(f"{name}: trained in {s:.0f} s", flush=True)
        runs[name] = out / name
    return runs


def students(out: Path, teacher: Path, args) -> dict:
    found = {}
    for name, command in (("reflow", ["reflow", str(teacher), "--pairs", str(args.pairs),
                                      f"train.steps={args.student_steps}"]),
                          ("consistency", ["distill", str(teacher), "--method", "consistency", "--steps", "1",
                                           f"distill.iterations=[{args.student_steps}]"])):
        done = out / f"{name}.txt"
        if not done.exists():
            before = set(out.iterdir())
            _, s = timed(ddpm, *command)
            done.write_text(str(one_folder(out, before | {done})))
            print(f"{name}: {s:.0f} s", flush=True)
        found[name] = Path(done.read_text())
    return found


def rows_of(runs: dict, n: int) -> list:
    plan = [("ddpm", []), ("ddpm", ["--sampler", "ddim", "--steps", "10"]),
            ("ddpm", ["--sampler", "dpmpp_2m", "--steps", "10"]),
            ("flow", []), ("flow", ["--sampler", "flow_euler", "--steps", "10"]),
            ("flow", ["--sampler", "dpmpp_2m", "--steps", "10"]),
            ("flow", ["--sampler", "flow_euler", "--steps", "1"]), ("flow", ["--sampler", "flow_euler", "--steps", "2", "--step-schedule", "trailing"]),
            ("reflow", ["--steps", "1"]), ("reflow", ["--steps", "2", "--step-schedule", "trailing"]),
            ("consistency", ["--steps", "1"]), ("consistency", ["--steps", "2"])]
    rows = []
    for name, sampling in plan:
        row = {"run": name, **evaluate(runs[name], n, *sampling)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list) -> str:
    lines = ["| run | sampling | SWD | MMD^2 |", "|---|---|---:|---:|"]
    lines += [f"| {r['run']} | {r['sampling']} | {r['swd']:.4f} | {r['mmd']:.5f} |" for r in rows]
    lines.append(f"| fresh data | - | {rows[0]['data_swd']:.4f} | {rows[0]['data_mmd']:.5f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--toy", default="swiss_roll")
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--student-steps", type=int, default=2000)
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--out", default="runs/flow_toy2d")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = train_pair(out, args)
    runs.update(students(out, runs["flow"], args))
    rows = rows_of(runs, args.n)
    (out / "flow_toy2d.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    print(text)
    (out / "flow_toy2d.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
