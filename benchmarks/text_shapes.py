"""Text-to-image on the bundled captioned shapes: prompt adherence on seen and held-out pairs, FID, one picture.

The set (`ddpm data shapes DIR --hold-out`: 6,000 captioned 32x32 images, 360 of the 432 classes; every shape
misses one colour, at all sizes and positions) trains `--config shapes_text` (20 minutes of wall clock on a
CPU). This script scores a trained run, or trains one first (--train):

    prompt  `ddpm eval RUN --metrics prompt`: --n captions of the set's classes in the wordings training used
            (every class equally often), one sample each, read by the exact shapes scorer; the shares of
            samples right in clean background, size, colour, shape, position and all of them, for the
            classes training saw and for the held-out colour-shape pairs apart
    fid     `ddpm eval RUN --metrics fid,clean`: the classifier-FID on the features of the shipped shapes
            classifier (ddpmlab.evaluate.shapes_classifier; offline, chosen by ddpm eval for a shapes
            folder), the samples prompted with training captions drawn from the folder, against the
            folder's images, beside --fid-n of the folder's own images against the rest; with
            --inception-weights FILE (never downloaded) also the FID on Inception-v3 features

It prints one table (also OUT/text_shapes.md, numbers in OUT/text_shapes.json) with the training wall clock and
the CPU, and writes the picture (default docs/text_shapes_prompts.png): one row per prompt, 4 seen and 4
held-out ones, the prompt written at the left, 8 samples a row.

    python benchmarks/text_shapes.py --run runs/shapes_text-...                # score a trained run
    python benchmarks/text_shapes.py --train                                   # write the data, train, score
    python benchmarks/text_shapes.py --run RUN --inception-weights pt_inception-2015-12-05-6726825d.pth  # + Inception
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.evaluate.prompt import held_out_of, prompt_cases, shapes_folder_of
from ddpmlab.evaluate.shapes import SCORES, score_shapes
from ddpmlab.io.images import grid_image
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request

ROOT = Path(__file__).resolve().parents[1]
PER_ROW = 8  # samples per prompt in the picture


def ddpm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddpmlab", *args], check=True)


def cpu() -> str:
    """The CPU's model name, its vector flags that torch uses, threads: what the timings were measured on."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    vector = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    capability = torch.backends.cpu.get_cpu_capability()
    return f"{name} ({' '.join(vector) or 'no AVX2'}; torch {capability}), {torch.get_num_threads()} threads here, fp32"


def train(args, out: Path) -> Path:
    """Write the captioned set (unless there) and train `--config shapes_text` on it; returns the run."""
    data = Path(args.data or out / "data")
    if not data.exists():
        ddpm("data", "shapes", str(data), "--hold-out", "--n", str(args.images), "--no-progress")
    ddpm("train", "--config", "shapes_text", f"data.path={data}", f"train.out_dir={out}", "train.name=run",
         "--no-progress", *args.overrides)
    return out / "run"


def training_time(run_dir: Path) -> dict:
    """The training steps and wall clock (seconds) of RUN/log.csv's last row."""
    with open(run_dir / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return {"steps": int(rows[-1]["step"]), "seconds": float(rows[-1]["time_s"])} if rows else {}


def evaluate(run_dir: Path, out: Path, name: str, metrics: str, n: int, *extra: str) -> dict:
    path = out / f"{name}.json"
    ddpm("eval", str(run_dir), "--metrics", metrics, "--n", str(n), "--no-progress", "--out", str(path), *extra)
    return json.loads(path.read_text())


def picture_cases(spec, about, seed: int):
    """4 seen and 4 held-out classes (distinct shapes each where the set has them, else picked by ``seed``) and
    a caption of each."""
    cases = prompt_cases(spec, held_out_of(spec, about), spec.num_classes, seed)
    order = np.random.default_rng([seed, 8]).permutation(len(cases.classes))
    chosen = []
    for held in (False, True):
        shapes = set()
        for c, prompt, h in ((cases.classes[i], cases.prompts[i], cases.held_out[i]) for i in order):
            shape = spec.attributes(int(c))["shape"]
            if h == held and shape not in shapes and len(shapes) < 4:
                shapes.add(shape)
                chosen.append((int(c), prompt, bool(h)))
    return chosen


def picture(run_dir: Path, path: Path, seed: int, guidance=None) -> list:
    """One row per prompt: the prompt (and how many of its samples are right in every attribute) at the left,
    PER_ROW samples drawn as the run samples; returns the rows' numbers."""
    run = load_run(run_dir, device="cpu")
    spec, about = shapes_folder_of(run.cfg)
    chosen = picture_cases(spec, about, seed)
    request = SamplingRequest(prompts=[p for _, p, _ in chosen], n=PER_ROW, seed=seed, guidance=guidance)
    plan = plan_request(run, request, log=print)
    x = draw_samples(run, plan, progress=False)
    right = score_shapes(x, [c for c, _, _ in chosen for _ in range(PER_ROW)], spec)["all"].view(len(chosen), -1)
    font = ImageFont.load_default(size=15)
    rows = [grid_image(x[k * PER_ROW:(k + 1) * PER_ROW], nrow=PER_ROW, scale=2) for k in range(len(chosen))]
    labels = [f"\"{p}\"{' (held out)' if h else ''}   {int(r.sum())}/{PER_ROW} right"
              for (_, p, h), r in zip(chosen, right)]
    width = max(int(font.getlength(t)) for t in labels) + 16
    canvas = Image.new("RGB", (width + rows[0].width, sum(r.height for r in rows)), "white")
    draw, y = ImageDraw.Draw(canvas), 0
    for row, text in zip(rows, labels):
        canvas.paste(row, (width, y))
        draw.text((8, y + row.height // 2), text, fill="black", font=font, anchor="lm")
        y += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    print(f"wrote {path} ({plan.describe()}, guidance {plan.guidance})")
    return [{"prompt": p, "held_out": h, "all_right": int(r.sum()), "of": PER_ROW}
            for (_, p, h), r in zip(chosen, right)]


def table(result: dict) -> str:
    m = result["prompt"]
    lines = ["| combinations | samples | " + " | ".join(SCORES) + " |", "|" + "---|" * (len(SCORES) + 2)]
    for group, words in (("seen", "seen in training"), ("held_out", "held out")):
        if f"prompt_n_{group}" in m:
            lines.append(f"| {words} | {m[f'prompt_n_{group}']} | "
                         + " | ".join(f"{100 * m[f'prompt_{k}_{group}']:.1f} %" for k in SCORES) + " |")
    t, q = result["training"], result["quality"]
    fid = f"classifier-FID {q['fid']:.2f} (data {q['data_fid']:.2f}, n={q['n']})"
    if "fid_inception" in q:
        fid += f"; Inception FID {q['fid_inception']:.2f} (data {q['data_fid_inception']:.2f}, n={q['n_inception']})"
    lines += ["", f"training: {t.get('steps')} steps, {t.get('seconds', 0) / 60:.1f} min wall clock on {result['cpu']}",
              f"sampling: {result['sampling']}; {fid}; clean backgrounds {100 * q['clean']:.1f} %"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=None, help="a trained text run on the shapes set (else --train)")
    ap.add_argument("--train", action="store_true", help="write the set and train --config shapes_text first")
    ap.add_argument("--data", default=None, help="the captioned shapes folder to train on (default OUT/data)")
    ap.add_argument("--images", type=int, default=6000, help="images of the set written for --train")
    ap.add_argument("--n", type=int, default=432, help="samples of the prompt metric (432: every class once)")
    ap.add_argument("--fid-n", type=int, default=1000, help="samples of the classifier-FID (more than 128)")
    ap.add_argument("--inception-n", type=int, default=2048, help="samples of the Inception FID (at least 2048)")
    ap.add_argument("--inception-weights", default=None, help="the FID Inception-v3 weights file")
    ap.add_argument("--picture", default=str(ROOT / "docs" / "text_shapes_prompts.png"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, default=None, help="guidance of every measure (default: the run's)")
    ap.add_argument("--out", default="runs/text_shapes")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the training (with --train)")
    args = ap.parse_args()
    if bool(args.run) == args.train:
        ap.error("give --run RUN (a trained run) or --train")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    common = ["--seed", str(args.seed)] + (["--guidance", str(args.guidance)] if args.guidance is not None else [])
    run_dir = Path(args.run) if args.run else train(args, out)
    result = {"run": str(run_dir), "cpu": cpu(), "training": training_time(run_dir),
              "trained_here_s": None if args.run else round(time.perf_counter() - start, 1)}
    prompt = evaluate(run_dir, out, "prompt", "prompt", args.n, *common)
    st = prompt["settings"]
    result["sampling"] = f"{st['sampler']} {st['steps']} steps, guidance {st['guidance']}"
    result["prompt"] = prompt["metrics"]
    quality = evaluate(run_dir, out, "quality", "fid,clean", args.fid_n, *common)
    base = quality.get("data_baseline") or {}
    result["quality"] = {"n": args.fid_n, "extractor": quality["extractor"]["identity"], **quality["metrics"],
                         **{f"data_{k}": v for k, v in base.items()}}
    if args.inception_weights:
        inception = evaluate(run_dir, out, "quality_inception", "fid", args.inception_n, *common,
                             "--extractor", "inception", "--inception-weights", args.inception_weights)
        result["quality"].update(n_inception=args.inception_n, fid_inception=inception["metrics"]["fid"],
                                 data_fid_inception=(inception.get("data_baseline") or {}).get("fid", float("nan")))
    result["picture"] = picture(run_dir, Path(args.picture), args.seed, args.guidance)
    (out / "text_shapes.json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    (out / "text_shapes.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
