"""Few-step students against their teacher: `ddpm distill` at 1, 2, 4 and 8 steps on the bundled MNIST digits.

One teacher run (--teacher RUN, or trained here with the bundled default config on the train split,
4,500 digits, as `ddpm train` would), then, each timed from the start of `ddpm distill` to its final
samples (distillation wall clock):

    progressive   Salimans & Ho 2022, Alg. 2: one chain of rounds halving distill.teacher_steps (64,
                  or --distill distill.teacher_steps=16) DDIM steps down to the fewest --steps; the
                  student at each of --steps K (1, 2, 4, 8) is the EMA at the end of its round, timed to
                  there; the rounds' iterations from --progressive-iterations
    consistency   Song et al. 2023, Alg. 2: one student (its training does not depend on the step
                  count), sampled at each of --consistency-steps (1, 2; Alg. 1 for more than one)

against the teacher itself at the same NFE with each of --baselines (ddpmlab samplers with their step
schedules, e.g. dpmpp_2m:karras, unipc:optimized; the best of them by classifier-FID is the row of
the main table, all of them are in the second), and the teacher with 250 ancestral (DDPM) steps.
An ``optimized`` schedule is fitted per NFE on 256 calibration noises (a 200-step reference run and
up to 16 (K + 1) runs of the sampler, K = min(NFE - 1, 8)): with a small --n it costs more than the samples.

Every model draws --n samples from the same noise seeds, scored against the held-out test split
(500 digits) by quality_per_minute.py's scoring: with the shipped MNIST classifier as the feature
network classifier-FID, KID, and the share of samples the classifier assigns to a digit with
probability >= 0.8 (it is confident on pure noise too); and, as `ddpm eval --metrics
judge,clean,rough` reports them (ddpmlab.evaluate.judges.digit_quality), the honest confident share
of the digit judge (which has a reject class) and its ratio to the real test digits' share, the
clean-background share and the rough share (the real test digits' row beside).  Prints a markdown
table and writes it, the numbers (JSON) and a picture to --out: the same x_T through the students
at --picture-steps and the teacher's DDPM-250, one labelled row per model.

    python benchmarks/few_step.py                                   # trains the teacher first
    python benchmarks/few_step.py --teacher runs/mnist-20250101-120000 --n 500
    python benchmarks/few_step.py --progressive-iterations 2000,1000 --consistency-iterations 4000
    python benchmarks/few_step.py --methods progressive --steps 2,4 train.steps=3000   # teacher override
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_per_minute import QUALITY_HEAD, cpu_name, quality_cells, real_scores, score  # its scoring

from ddpmlab.config import load_config
from ddpmlab.errors import DDPMError, OptionError
from ddpmlab.evaluate.bench import BenchEntry, parse_nfes
from ddpmlab.evaluate.features import classifier_extractor
from ddpmlab.evaluate.metrics import check_fid_samples
from ddpmlab.io.checkpoint import load_run_config
from ddpmlab.io.images import grid_image
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request, resolve_device, run_guidance
from ddpmlab.samplers.student import is_power_of_two
from ddpmlab.training.tasks.distill import distill_run, round_plan
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.precision import cpu_flags

DEFAULT_BASELINES = "ddim:trailing,dpmpp_2m:karras,dpmpp_2m:optimized,unipc:optimized"
METHODS = ("progressive", "consistency")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _quiet(message: str) -> None:
    pass


def train_teacher(out: Path, seed: int, device: str, overrides, progress: bool) -> tuple:
    """The default `ddpm train` config (with ``overrides``) on the train split: (run folder, seconds, note)."""
    cfg = load_config("mnist", [*overrides, f"train.out_dir={out}", "train.name=teacher", "data.split=train",
                                f"train.seed={seed}", "train.tensorboard=false", f"train.device={device}"])
    t0 = time.perf_counter()
    run_dir = train(cfg, progress=progress)
    seconds = time.perf_counter() - t0
    return run_dir, seconds, f"trained here: {cfg.train.steps} steps of batch {cfg.train.batch_size}"


def check_teacher(run) -> None:
    if run.cfg.data.dataset != "mnist" or not run.is_image:
        raise SystemExit(f"--teacher {run.dir}: a run on data.dataset={run.cfg.data.dataset}; this benchmark scores "
                         "MNIST digits with the MNIST classifier: give an MNIST run")
    if run.cfg.distill.teacher:
        raise SystemExit(f"--teacher {run.dir} is itself a distilled student; give its teacher run")
    if run.cfg.data.split != "train":
        print(f"warning: {run.dir} was trained on data.split={run.cfg.data.split}: the test digits it is scored "
              "against were in its training data")


def distill_student(teacher_dir: Path, out: Path, method: str, steps: int, iterations, args, device,
                    extra=()) -> tuple:
    """`ddpm distill teacher_dir --method M --steps K`: (student folder, wall-clock seconds)."""
    overrides = [f"distill.iterations=[{','.join(map(str, iterations))}]", f"train.out_dir={out}",
                 f"train.name={method}{steps}", f"train.seed={args.seed}", "train.tensorboard=false",
                 f"train.device={args.device}", *extra]
    if args.batch_size is not None:
        overrides.append(f"distill.batch_size={args.batch_size}")
    overrides += args.distill
    t0 = time.perf_counter()
    run_dir = distill_run(teacher_dir, method, steps, overrides, progress=args.progress)
    _sync(device)
    return run_dir, time.perf_counter() - t0


def progressive_chain(teacher_dir: Path, out: Path, args, device) -> list:
    """One progressive distillation down to the fewest --steps; the student of every round that ends at one
    of --steps is its EMA at that round's end (a checkpoint), timed to that point (Salimans & Ho 2022 report
    the students of one chain the same way).  [(label, method, steps, folder, seconds, note, weights file)]."""
    top = min(args.steps)
    its = args.progressive_iterations
    every = math.gcd(*its)  # a checkpoint at every round's end
    run_dir, seconds = distill_student(teacher_dir, out, "progressive", top, its, args, device,
                                       extra=[f"train.save_every={every}", "train.keep_checkpoints=1000"])
    plan = round_plan(load_run_config(run_dir))
    with open(run_dir / "log.csv", newline="") as f:
        clock = {int(row["step"]): float(row["time_s"]) for row in csv.DictReader(f)}
    last = max(clock)
    rows, done = [], 0
    for r, (m, n) in enumerate(plan):
        done += n
        if m in args.steps:
            ckpt = run_dir / "checkpoints" / f"step_{done:07d}" / "ema.safetensors"
            # the chain's wall clock less the loop time after this round's end (the log's clock there, else pro rata)
            at = seconds - (clock[last] - clock.get(done, clock[last] * done / last))
            rows.append((f"progressive student, {m} step{'s' if m > 1 else ''}", "progressive", m, run_dir,
                         at, f"round {r + 1} of one chain from {plan[0][0] * 2} DDIM steps, {done} iterations", ckpt))
    return rows


def draw(run, sampler: str, steps: int, timesteps, n: int, seed: int, progress: bool) -> torch.Tensor:
    """n samples of ``run``: noise batch b from seed + b (generate's rule), so every model shares x_T."""
    plan = plan_request(run, SamplingRequest(sampler, steps, timesteps, seed=seed, n=n), log=_quiet)
    return draw_samples(run, plan, n, seed=seed, progress=progress)


def labelled_rows(rows, path: Path, scale: int = 2) -> Path:
    """One row of images per (label, (k, C, H, W) tensor), the label in a white column on the left."""
    images = [grid_image(x, nrow=len(x), scale=scale).convert("L") for _, x in rows]
    measure = ImageDraw.Draw(Image.new("L", (1, 1)))
    label_w = 12 + int(max(measure.textlength(label) for label, _ in rows))
    width = label_w + max(img.width for img in images)
    canvas = Image.new("L", (width, sum(img.height for img in images)), 255)
    draw_text = ImageDraw.Draw(canvas)
    top = 0
    for (label, _), img in zip(rows, images):
        canvas.paste(img, (label_w, top))
        draw_text.text((4, top + img.height // 2 - 5), label, fill=0)
        top += img.height
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _clock(seconds) -> str:
    if seconds is None:
        return ""
    m, s = divmod(seconds, 60)
    return f"{int(m)} min {s:.0f} s" if m else f"{s:.1f} s"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default=None, metavar="RUN",
                   help="the teacher run (default: train one here with the bundled default config)")
    p.add_argument("--methods", default="progressive,consistency", help="distillation methods (default both)")
    p.add_argument("--steps", default="1,2,4,8", help="progressive students' steps, powers of two (default 1,2,4,8)")
    p.add_argument("--consistency-steps", default="1,2", help="steps the consistency student samples with "
                   "(default 1,2)")
    p.add_argument("--progressive-iterations", default="2000",
                   help="iterations of each progressive round, comma-separated, the last repeats (default 2000)")
    p.add_argument("--consistency-iterations", type=int, default=2000, help="consistency iterations (default 2000)")
    p.add_argument("--batch-size", type=int, default=None, help="distill.batch_size (default the config's, 128)")
    p.add_argument("--distill", action="append", default=[], metavar="KEY=VALUE",
                   help="another distill.* override for every student, e.g. --distill distill.lr=2e-4 (repeatable)")
    p.add_argument("--baselines", default=DEFAULT_BASELINES,
                   help=f"the teacher's samplers at the students' NFE, sampler[:timesteps] "
                   f"(default {DEFAULT_BASELINES})")
    p.add_argument("--ancestral-steps", type=int, default=250, help="the teacher's DDPM steps (default 250)")
    p.add_argument("--n", type=int, default=1000, help="samples scored per model (default 1000)")
    p.add_argument("--picture-steps", default="1,2,4", help="student steps in the picture (default 1,2,4)")
    p.add_argument("--picture-n", type=int, default=8, help="samples per row of the picture (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--out", default="runs/few-step", help="output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides of the teacher trained here, e.g. train.steps=3000 (not with --teacher)")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in args.methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method '{m}'; choose from {', '.join(METHODS)}")
    try:
        args.steps = named(parse_nfes, args.steps, "--steps")
        args.consistency_steps = named(parse_nfes, args.consistency_steps, "--consistency-steps")
        args.picture_steps = named(parse_nfes, args.picture_steps, "--picture-steps")
        args.progressive_iterations = [int(v) for v in args.progressive_iterations.split(",") if v.strip()]
        args.baselines = [named(BenchEntry.parse, b, "--baselines") for b in args.baselines.split(",") if b.strip()]
    except ValueError:
        p.error(f"--progressive-iterations must be comma-separated integers, got '{args.progressive_iterations}'")
    except DDPMError as e:
        p.error(str(e))
    bad = [k for k in args.steps if not is_power_of_two(k)]
    if "progressive" in args.methods and bad:
        p.error(f"--steps {bad[0]}: progressive students halve their steps, so each must be a power of two "
                "(1, 2, 4, 8, ...)")
    if not args.progressive_iterations or min(args.progressive_iterations) < 1 or args.consistency_iterations < 1:
        p.error("iteration counts must be positive")
    if args.picture_n < 1:
        p.error(f"--picture-n must be at least 1, got {args.picture_n}")
    if args.teacher is not None and args.overrides:
        p.error(f"config overrides ({' '.join(args.overrides)}) apply to a teacher trained here; drop them with "
                "--teacher")
    return args


def named(parse, text: str, option: str):
    """``parse(text)``; an OptionError of the library becomes a DDPMError naming this script's ``option``."""
    try:
        return parse(text)
    except OptionError as e:
        raise DDPMError(e.named({e.option: option})) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        device = resolve_device(args.device)
    except OptionError as e:
        raise SystemExit(f"error: {e.named({'device': '--device'})}") from None
    extractor = classifier_extractor(device)
    try:
        check_fid_samples(args.n, extractor.num_features)  # before anything is trained
    except OptionError as e:
        raise SystemExit(f"error: {e.named({'n': '--n'})}") from None
    out = Path(args.out)
    for sub in ("teacher", "students"):
        if (out / sub).exists() and (sub == "students" or args.teacher is None):
            raise SystemExit(f"{out / sub} exists: give another --out")
    out.mkdir(parents=True, exist_ok=True)
    flags = cpu_flags() or set()
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, device {device}; flags: "
               + ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags))
    print(machine)

    teacher_seconds = None
    if args.teacher is None:
        teacher_dir, teacher_seconds, teacher_note = train_teacher(out, args.seed, args.device, args.overrides,
                                                                   args.progress)
    else:
        teacher_dir, teacher_note = Path(args.teacher), f"given: {args.teacher}"
    teacher = load_run(teacher_dir, "ema", device)
    check_teacher(teacher)
    teacher_note += f" ({teacher.checkpoint}, EMA)"

    # ---- the students, each timed as `ddpm distill` runs
    students = []  # (label, method, steps it samples with, folder, seconds, note, EMA weights file or None)
    if "progressive" in args.methods:
        students += progressive_chain(teacher_dir, out / "students", args, device)
    if "consistency" in args.methods:
        top = max(args.consistency_steps)
        run_dir, seconds = distill_student(teacher_dir, out / "students", "consistency", top,
                                           [args.consistency_iterations], args, device)
        for k in args.consistency_steps:
            students.append((f"consistency student, {k} step{'s' if k > 1 else ''}", "consistency", k, run_dir,
                             seconds, f"{args.consistency_iterations} iterations (one student for all steps)", None))

    # ---- scoring: the held-out test digits' features once
    real, real_feats, real_row = real_scores(extractor)
    real_share = real_row["confident"]
    sample_seed = 1000 + args.seed
    first = {}  # (method, steps) -> the first picture_n samples (the same x_T for every model)
    results = []

    for label, method, k, run_dir, seconds, note, weights in students:
        run = load_run(run_dir, "ema", device, weights_file=weights)
        if weights is not None:  # a round's student samples with that round's steps
            run.cfg = dataclasses.replace(run.cfg, distill=dataclasses.replace(run.cfg.distill, steps=k))
        x = draw(run, "student", k, None, args.n, sample_seed, args.progress)
        first[(method, k)] = x[:args.picture_n]
        results.append({"model": label, "method": method, "nfe": k, "run": str(run_dir),
                        "distill_seconds": round(seconds, 1), "recipe": note, **score(x, extractor, real_feats, real)})

    nfes = sorted({r["nfe"] for r in results}) or args.steps
    baselines = {}  # label -> {nfe: scores}
    for k in nfes:
        for entry in args.baselines:
            x = draw(teacher, entry.name, k, entry.timesteps, args.n, sample_seed, args.progress)
            baselines.setdefault(entry.label, {})[k] = score(x, extractor, real_feats, real)
        best = min(baselines, key=lambda b: baselines[b][k]["fid"])
        results.append({"model": f"teacher, {best} (best of {len(args.baselines)})", "method": "teacher", "nfe": k,
                        "sampler": best, "distill_seconds": None, **baselines[best][k]})
    x = draw(teacher, "ddpm", args.ancestral_steps, None, args.n, sample_seed, args.progress)
    first[("teacher", "ddpm")] = x[:args.picture_n]
    results.append({"model": f"teacher, ddpm {args.ancestral_steps} steps", "method": "teacher",
                    "nfe": args.ancestral_steps, "sampler": "ddpm", "distill_seconds": None,
                    **score(x, extractor, real_feats, real)})

    # ---- table, numbers, picture
    guidance = run_guidance(teacher, None, log=_quiet) if teacher.num_classes else None
    cost = 1 if guidance is None else 2  # guidance: one batched call with and without the label per step
    if guidance is not None:
        teacher_note += f"; every model samples with the teacher's guidance {guidance:g} (NFE = 2 x steps)"
    order = {"progressive": 0, "consistency": 1, "teacher": 2}
    results.sort(key=lambda r: (r["nfe"], order[r["method"]]))
    lines = [f"Machine: {machine}. Teacher: {teacher_note}"
             + (f", {_clock(teacher_seconds)}" if teacher_seconds is not None else "")
             + f". {args.n} samples per model from the same noise seeds, scored against the {len(real)} held-out "
             "test digits (shipped classifier's features; the digit judge).", "",
             "| model | steps | NFE | distillation wall clock | classifier-FID | KID | confident share (p >= 0.8) | "
             f"share / real | {QUALITY_HEAD} |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['nfe']} | {r['nfe'] * cost} | {_clock(r['distill_seconds'])} | "
                     f"{r['fid']:.2f} | {r['kid']:.4f} | {r['confident']:.1%} | {r['confident'] / real_share:.2f} | "
                     f"{quality_cells(r)} |")
    lines.append(f"| real test digits | | | | | | {real_share:.1%} | 1.00 | {quality_cells(real_row)} |")
    lines += ["", "The teacher's samplers at the students' steps (classifier-FID; best per column in bold):", "",
              "| sampler | " + " | ".join(f"{k} steps" for k in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for b, by_nfe in baselines.items():
        cells = []
        for k in nfes:
            v = by_nfe[k]["fid"]
            cells.append(f"**{v:.2f}**" if v == min(baselines[c][k]["fid"] for c in baselines) else f"{v:.2f}")
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "few_step.md").write_text(table + "\n")
    (out / "few_step.json").write_text(json.dumps(
        {"machine": machine, "teacher": str(teacher_dir), "teacher_note": teacher_note,
         "teacher_train_seconds": teacher_seconds, "n": args.n, "seed": args.seed,
         "progressive_iterations": args.progressive_iterations, "consistency_iterations": args.consistency_iterations,
         "real_confident": real_share, "real": real_row, "results": results,
         "baselines": {b: {str(k): v for k, v in by.items()} for b, by in baselines.items()}}, indent=1))
    rows = [(f"{m} {k} step{'s' if k > 1 else ''}", first[(m, k)]) for m in ("progressive", "consistency")
            for k in args.picture_steps if (m, k) in first]
    rows.append((f"teacher DDPM-{args.ancestral_steps}", first[("teacher", "ddpm")]))
    print(f"wrote {labelled_rows(rows, out / 'few_step.png')} (rows: {', '.join(label for label, _ in rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
