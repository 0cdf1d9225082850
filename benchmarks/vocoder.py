"""DiffWave as a vocoder against Griffin-Lim on held-out clips: MR-STFT distance, MCD and real-time factor.

Trains a vocoder run (configs/vocoder.yaml: the small DiffWave with its mel conditioner, T = 50, the
paper's 6-step fast sampling) on the sound folder --data for --steps training steps (or --minutes of
wall clock; or reuses --run), then takes --n clips spread over the sound folder --held-out (each at its
own length, resampled to the run's rate where needed) and, for each, re-synthesises it from its log-mel
spectrogram with the run's own sampler and inverts the same spectrogram with Griffin-Lim (32 iterations,
momentum 0.99), exactly as `ddpm vocode` does (ddpmlab.evaluate.vocoder.compare). Prints a markdown table
of the means over the clips (and how many clips DiffWave beat Griffin-Lim on), with the CPU, the threads
and the commit; writes it, the per-clip numbers (JSON) and the first four clips' WAV files (original,
DiffWave, Griffin-Lim) to --out.

    python benchmarks/vocoder.py --data digits/train --held-out digits/held_out --steps 2000
    python benchmarks/vocoder.py --run runs/vocoder --held-out digits/held_out --n 100 --sampler ddpm
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.data.audio import SOUND_EXTENSIONS  # noqa: E402
from ddpmlab.evaluate.vocoder import compare, read_recording  # noqa: E402
from ddpmlab.io.sound import write_wav  # noqa: E402
from ddpmlab.runs import SamplingRequest, load_run  # noqa: E402

MEASURES = ("mr_stft", "mcd_db", "rtf")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def train_vocoder(data: Path, out: Path, steps: int, minutes, overrides) -> tuple:
    """The run folder of a vocoder trained on ``data`` (configs/vocoder.yaml), and its training seconds."""
    budget = [f"train.minutes={minutes}", "train.steps=1000000"] if minutes else ["train.minutes=null",
                                                                                  f"train.steps={steps}"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpmlab", "train", "--config", "vocoder", f"data.path={data}",
                    f"train.out_dir={out}", "train.name=vocoder", "train.tensorboard=false",
                    "train.mixed_precision=no", *budget, *overrides, "--no-progress"], check=True)
    return out / "vocoder", time.perf_counter() - t0


def held_out_files(folder: Path, n: int) -> list:
    """``n`` sound files spread evenly over the sorted files below ``folder`` (all of them if fewer)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SOUND_EXTENSIONS and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"--held-out {folder}: no WAV, FLAC or OGG files below it")
    n = min(n, len(files))
    return [files[i * len(files) // n] for i in range(n)]


def table(rows: list, header: str) -> str:
    means = {name: {m: sum(r[name][m] for r in rows) / len(rows) for m in MEASURES}
             for name in ("diffwave", "griffin_lim")}
    wins = sum(r["diffwave"]["mr_stft"] < r["griffin_lim"]["mr_stft"] for r in rows)
    lines = [header, "", "| re-synthesis | MR-STFT | MCD (dB) | RTF |", "|---|---|---|---|"]
    for name in ("diffwave", "griffin_lim"):
        lines.append(f"| {name} | {means[name]['mr_stft']:.3f} | {means[name]['mcd_db']:.2f} | "
                     f"{means[name]['rtf']:.3f} |")
    lines.append(f"\nDiffWave's MR-STFT below Griffin-Lim's on {wins} of {len(rows)} clips.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, help="the training sound folder (not needed with --run)")
    ap.add_argument("--held-out", type=Path, required=True, help="the sound folder of clips to re-synthesise")
    ap.add_argument("--run", type=Path, default=None, help="a vocoder run to reuse instead of training one")
    ap.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    ap.add_argument("--minutes", type=float, default=None, help="train for this wall clock instead of --steps")
    ap.add_argument("--n", type=int, default=50, help="held-out clips (default 50)")
    ap.add_argument("--sampler", default=None, help="sampler (default: the run's own, diffwave_fast)")
    ap.add_argument("--steps-sampling", type=int, default=None, help="sampling steps (default: the run's own, 6)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_vocoder"))
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the trained run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    seconds = None
    if args.run is None:
        if args.data is None:
            raise SystemExit("give --data (a sound folder to train on) or --run (a vocoder run)")
        args.run, seconds = train_vocoder(args.data, args.out, args.steps, args.minutes, args.overrides)
    run = load_run(args.run, device="cpu")
    request = SamplingRequest(sampler=args.sampler, steps=args.steps_sampling, seed=args.seed)
    rows = []
    for i, path in enumerate(held_out_files(args.held_out, args.n)):
        wave, _ = read_recording(path, run)
        result = compare(run, wave, request)
        rows.append({"file": str(path), **{name: s for name, (_, s) in result.items()}})
        if i < 4:
            rate = run.cfg.data.sample_rate
            write_wav(args.out / f"{i}_original.wav", wave, rate)
            for name, (x, _) in result.items():
                write_wav(args.out / f"{i}_{name}.wav", x, rate)
    cfg = run.cfg
    trained = f"{seconds:.0f} s of training" if seconds is not None else f"the reused run {args.run}"
    header = (f"Vocoder on {len(rows)} held-out clips of {args.held_out} ({cfg.data.sample_rate} Hz): {args.run.name}, "
              f"{cfg.train.steps} training steps ({trained}), sampler {args.sampler or cfg.train.sample_sampler} "
              f"{args.steps_sampling or cfg.train.sample_steps} steps; {cpu_name()}, {torch.get_num_threads()} "
              f"threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), trained with mixed precision "
              f"{cfg.train.mixed_precision}, vocoded in fp32, commit {commit()}")
    text = table(rows, header)
    print(text)
    (args.out / "vocoder.md").write_text(text + "\n")
    (args.out / "vocoder.json").write_text(json.dumps({"header": header, "clips": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
