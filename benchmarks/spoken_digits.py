"""Class-conditional spoken digits: a run's acc, is and fd (ddpm eval) beside what real clips score.

Trains a run of --config (spoken_digits_mel: a UNet on log-mel images, made sound by Griffin-Lim; spoken_digits:
DiffWave on the waveform) on --data/train of a `ddpm data spoken-digits` set for --steps training steps or --minutes
of wall clock (fp32, as the issue's benchmark asks; or reuses --run), then reports

* acc, is, fd of --n samples as `ddpm eval` computes them (ddpmlab.evaluate.run.evaluate_run: the shipped
  spoken-digit classifier on the samples' waveforms, a mel run's after their inversion, against --data/held_out);
* the classifier's accuracy on the real held-out clips, and on their Griffin-Lim re-synthesis from the run's mel
  settings (a mel run: through its normalised images, the ceiling of that route; a waveform run: its data.* mel);
* the training wall clock, and the real-time factor of drawing one sample of each digit (sampler, and a mel
  run's inversion apart): seconds of computing per second of sound;

with the CPU, threads and commit, as a markdown table and JSON in --out.  --docs also writes those ten samples as
docs/audio/<config>_<digit>.wav and their waveforms and spectrograms as docs/<config>.png.

    python benchmarks/spoken_digits.py --data data/spoken_digits --minutes 20
    python benchmarks/spoken_digits.py --data data/spoken_digits --run runs/spoken_digits_mel --docs
    python benchmarks/spoken_digits.py --data data/spoken_digits --config spoken_digits --minutes 20
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vocoder import commit, cpu_name  # noqa: E402

from ddpmlab.data.audio_mel import mel_image  # noqa: E402
from ddpmlab.data.mel import config_mel  # noqa: E402
from ddpmlab.data.spoken_digits import HELD_OUT, TRAIN  # noqa: E402
from ddpmlab.evaluate.audio_quality import griffin_lim_from_mel  # noqa: E402
from ddpmlab.evaluate.mel_sound import as_sound, griffin_lim_sound, is_mel_run  # noqa: E402
from ddpmlab.evaluate.run import EvalSettings, evaluate_run, format_results  # noqa: E402
from ddpmlab.evaluate.speech_classifier import (  # noqa: E402
    digit_order,
    load_speech_classifier,
    probabilities,
    sound_reference,
)
from ddpmlab.io.sound import write_wav  # noqa: E402
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request  # noqa: E402
from ddpmlab.viz.sound import save_sound_picture  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train(config: str, data: Path, out: Path, steps: int, minutes, overrides) -> tuple:
    """(the run folder trained on data/train with ``config``, its wall-clock seconds)."""
    budget = [f"train.minutes={minutes}", "train.steps=1000000"] if minutes else ["train.minutes=null",
                                                                                  f"train.steps={steps}"]
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpmlab", "train", "--config", config, f"data.path={data / TRAIN}",
                    f"train.out_dir={out}", f"train.name={config}", "train.tensorboard=false",
                    "train.mixed_precision=no", *budget, *overrides, "--no-progress"], check=True)
    return out / config, time.perf_counter() - t0


def logged_training(run_dir: Path) -> tuple:
    """(training steps, seconds) of the run's last logged step (RUN/log.csv)."""
    with open(run_dir / "log.csv") as f:
        rows = list(csv.DictReader(f))
    return (int(rows[-1]["step"]), float(rows[-1]["time_s"])) if rows else (0, 0.0)


def accuracy(x: torch.Tensor, labels: torch.Tensor, class_names) -> float:
    """The shipped classifier's share of clips x (n, 1, 16000) called the digit of their label."""
    truth = torch.tensor(digit_order(class_names))[labels]
    return float((probabilities(load_speech_classifier(), x).argmax(1) == truth).float().mean())


def real_clips(run, n: int) -> dict:
    """The classifier on ``n`` held-out clips (spread over the split) and on their Griffin-Lim re-synthesis."""
    held = sound_reference(run)
    idx = torch.linspace(0, len(held) - 1, min(n, len(held))).round().long()
    x, y, d = held.clips[idx], held.labels[idx], run.cfg.data
    t0 = time.perf_counter()
    if is_mel_run(run):  # through the run's own images: what its Griffin-Lim can give at best
        resynth = griffin_lim_sound(mel_image(x, run.cfg), d, seed=0)
    else:
        resynth = torch.cat([griffin_lim_from_mel(config_mel(part, d), d.length, d,
                                                  generator=torch.Generator().manual_seed(b))
                             for b, part in enumerate(x.split(64))]).clamp(-1, 1)
    seconds = time.perf_counter() - t0
    return {"n": len(x), "acc_real": accuracy(x, y, held.class_names),
            "acc_griffin_lim": accuracy(resynth, y, held.class_names),
            "rtf_griffin_lim": seconds / (len(x) * d.length / d.sample_rate)}


def one_of_each(run, seed: int, sampler, steps) -> tuple:
    """(ten samples as sound, one per class, their real-time factors: sampler and a mel run's inversion)."""
    plan = plan_request(run, SamplingRequest(sampler, steps, n=run.num_classes or 10, seed=seed), log=lambda m: None)
    t0 = time.perf_counter()
    x = draw_samples(run, plan, progress=False)
    t1 = time.perf_counter()
    sound = as_sound(run, x, seed=seed)
    t2 = time.perf_counter()
    audio = len(x) * run.cfg.data.length / run.cfg.data.sample_rate
    return sound, plan, {"rtf_sampling": (t1 - t0) / audio, "rtf_inversion": (t2 - t1) / audio}


def write_docs(run, sound: torch.Tensor, plan, name: str) -> list:
    """docs/audio/<name>_<class>.wav for each sample and docs/<name>.png (waveforms and spectrograms)."""
    names = [run.class_names[int(k)] if run.class_names else str(int(k)) for k in plan.labels]
    files = [write_wav(ROOT / "docs" / "audio" / f"{name}_{c}.wav", s, run.cfg.data.sample_rate)
             for c, s in zip(names, sound)]
    title = f"{name}: {plan.sampler} {plan.steps} steps"
    return files + [save_sound_picture(sound, ROOT / "docs" / f"{name}.png", run.cfg.data, title, names)]


def report(args, run, res: dict, real: dict, rtf: dict, steps: int, seconds: float) -> str:
    cfg, m = run.cfg, res["metrics"]
    what = "log-mel images + Griffin-Lim" if is_mel_run(run) else "waveform DiffWave"
    header = (f"Spoken digits, {what} ({args.run.name}, config {args.config}): {steps} training steps in "
              f"{seconds / 60:.1f} min (mixed precision {cfg.train.mixed_precision}); {res['settings']['n']} samples, "
              f"{res['settings']['sampler']} {res['settings']['steps']} steps, guidance {res['settings']['guidance']}; "
              f"{cpu_name()}, {torch.get_num_threads()} threads (OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), commit {commit()}")
    rows = ["| measure | value |", "|---|---|"]
    rows += [f"| samples: {k} | {v:.4g} |" for k, v in m.items()]
    rows += [f"| real held-out clips ({real['n']}): acc | {real['acc_real']:.4g} |",
             f"| their Griffin-Lim re-synthesis: acc | {real['acc_griffin_lim']:.4g} |",
             f"| RTF sampling (one of each digit) | {rtf['rtf_sampling']:.3f} |"]
    if is_mel_run(run):
        rows.append(f"| RTF inversion (Griffin-Lim) | {rtf['rtf_inversion']:.3f} |")
    return "\n".join([header, "", *rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True, help="a `ddpm data spoken-digits` folder (train/, held_out/)")
    ap.add_argument("--config", default="spoken_digits_mel", help="the run's config (default spoken_digits_mel)")
    ap.add_argument("--run", type=Path, default=None, help="a run to reuse instead of training one")
    ap.add_argument("--steps", type=int, default=500, help="training steps (default 500)")
    ap.add_argument("--minutes", type=float, default=None, help="train for this wall clock instead of --steps")
    ap.add_argument("--n", type=int, default=500, help="samples scored (default 500; fd needs more than 128)")
    ap.add_argument("--metrics", default=None, help="comma-separated metrics (default: acc, is, fd)")
    ap.add_argument("--n-real", type=int, default=600, help="held-out clips scored and re-synthesised (default 600)")
    ap.add_argument("--sampler", default=None, help="sampler (default: the run's own)")
    ap.add_argument("--sampling-steps", type=int, default=None, help="sampling steps (default: the run's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench_spoken_digits"))
    ap.add_argument("--docs", action="store_true", help="write docs/audio/*.wav and docs/<config>.png")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides of the trained run")
    args = ap.parse_args()
    if not (args.data / TRAIN).is_dir() or not (args.data / HELD_OUT).is_dir():
        raise SystemExit(f"--data {args.data}: not a `ddpm data spoken-digits` folder (no {TRAIN}/ and {HELD_OUT}/)")
    args.out.mkdir(parents=True, exist_ok=True)
    wall = None
    if args.run is None:
        args.run, wall = train(args.config, args.data, args.out, args.steps, args.minutes, args.overrides)
    steps, seconds = logged_training(args.run)
    run = load_run(args.run, device="cpu")
    settings = EvalSettings(metrics=args.metrics.split(",") if args.metrics else [], n=args.n, sampler=args.sampler,
                            steps=args.sampling_steps, seed=args.seed)
    res, _ = evaluate_run(args.run, settings, "cpu", progress=False, out=args.out / "eval.json")
    print(format_results(res))
    sound, plan, rtf = one_of_each(run, args.seed, args.sampler, args.sampling_steps)
    real = real_clips(run, args.n_real)
    text = report(args, run, res, real, rtf, steps, wall if wall is not None else seconds)
    print(text)
    (args.out / "spoken_digits.md").write_text(text + "\n")
    (args.out / "spoken_digits.json").write_text(json.dumps({"eval": res, "real": real, "rtf": rtf, "steps": steps,
                                                             "training_seconds": seconds}, indent=2, default=str))
    if args.docs:
        for f in write_docs(run, sound, plan, Path(args.config).stem):
            print(f"wrote {f}")


if __name__ == "__main__":
    main()
