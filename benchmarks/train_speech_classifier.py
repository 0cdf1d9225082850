"""Train the spoken-digit classifier that ships with ddpmlab (the judge of sound runs in ``ddpm eval``).

    python benchmarks/train_speech_classifier.py       # -> ddpmlab/evaluate/assets/speech_digits_classifier.safetensors
    python benchmarks/train_speech_classifier.py --data data/spoken_digits --out c.safetensors

Trains on the ``train`` split of a ``ddpm data spoken-digits`` set (default: one written to a temporary folder with
seed 1 and 300 clips a digit, so not the clips of the default seed 0) with random level, shift and added noise,
and an eleventh class "not a digit" (noise, silence, hard-clipped and shuffled speech, speech-shaped noise;
:func:`ddpmlab.evaluate.speech_classifier.not_digits`) a fifth of each batch.  Then, with the weights exactly as
stored (float16), it measures the accuracy on the ``held_out`` split (voice variants never trained on), the share of
garbage made from held-out clips called "not a digit", and the mean max-probability and entropy on white noise and
on silence, and records them in the file's metadata.  Everything random is seeded.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpmlab.data.audio import AudioFolderDataset
from ddpmlab.data.spoken_digits import HELD_OUT, TRAIN, write_spoken_digits
from ddpmlab.evaluate.speech_classifier import (
    NOT_A_DIGIT,
    WEIGHTS,
    SpeechDigitClassifier,
    confidence,
    digit_order,
    load_speech_classifier,
    not_digits,
    probabilities,
    save_speech_classifier,
)

CONFIG = {"width": 16, "num_features": 128, "num_classes": NOT_A_DIGIT + 1, "dropout": 0.2}


def load_split(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(clips (N, 1, 16000), digits (N,)) of a split folder."""
    ds = AudioFolderDataset(folder)
    return ds.clips, torch.tensor(digit_order(ds.class_names))[ds.labels]


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random level (-12..+6 dB), circular shift (up to 0.3 s) and, on half the clips, white noise 5-40 dB below."""
    n = len(x)
    gain = 10 ** ((torch.rand(n, 1, 1, generator=gen) * 18 - 12) / 20)
    shifts = torch.randint(-4800, 4801, (n,), generator=gen)
    x = torch.stack([c.roll(int(s), -1) for c, s in zip(x, shifts)]) * gain
    rms = x.pow(2).mean(-1, keepdim=True).sqrt()
    snr = 5 + 35 * torch.rand(n, 1, 1, generator=gen)
    noisy = (torch.rand(n, 1, 1, generator=gen) < 0.5).float()
    return (x + noisy * rms * 10 ** (-snr / 20) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def train(x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
          minutes: float) -> SpeechDigitClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = SpeechDigitClassifier(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    garbage_n = batch_size // 4
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            junk = not_digits(x[torch.randint(len(x), (garbage_n,), generator=gen)], gen)
            inputs = torch.cat([augment(x[idx], gen), junk])
            targets = torch.cat([y[idx], torch.full((garbage_n,), NOT_A_DIGIT)])
            loss = F.cross_entropy(model(inputs), targets, label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}  ({time.time() - t0:.0f} s)", flush=True)
        if minutes and time.time() - t0 > 60 * minutes and epoch + 1 < epochs:
            print(f"stopping: the {minutes:g}-minute budget is spent")  # the schedule ends early: noted in the file
            break
    return model.eval()


def measure(net, x: torch.Tensor, y: torch.Tensor, seed: int) -> dict:
    """Held-out accuracy (11-way argmax; "not a digit" is wrong), garbage rejected, noise and silence confidence."""
    gen = torch.Generator().manual_seed(seed + 1)
    p = probabilities(net, x)
    white = torch.randn((200, *x.shape[1:]), generator=gen) * 10 ** torch.linspace(-3, -0.5, 200)[:, None, None]
    return {"held_out_accuracy": float((p.argmax(1) == y).float().mean()),
            "held_out_not_a_digit": confidence(p)["not_a_digit"],
            "garbage_not_a_digit": confidence(probabilities(net, not_digits(x, gen)))["not_a_digit"],
            "white_noise": confidence(probabilities(net, white.clamp(-1, 1))),
            "silence": confidence(probabilities(net, torch.zeros((10, *x.shape[1:]))))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a ddpm data spoken-digits folder (default: write one, seed 1)")
    p.add_argument("--out", default=str(WEIGHTS), help=f"output safetensors file (default {WEIGHTS})")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=0, help="stop after this many minutes of training (0: never)")
    args = p.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else write_spoken_digits(Path(tmp) / "digits", 300, seed=1)
        x, y = load_split(data / TRAIN)
        x_held, y_held = load_split(data / HELD_OUT)
    print(f"{len(x)} training clips, {len(x_held)} held-out clips (other voices) from {args.data or 'seed 1'}")
    model = train(x, y, args.epochs, args.batch_size, args.lr, args.seed, args.minutes)
    meta = {"config": CONFIG, "script": "benchmarks/train_speech_classifier.py",
            "data": args.data or "ddpm data spoken-digits --n-per-digit 300 --seed 1", "train_clips": len(x),
            "held_out_clips": len(x_held), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "seed": args.seed}
    save_speech_classifier(model, args.out, {**meta, "held_out_accuracy": "pending"})
    scores = measure(load_speech_classifier(path=args.out), x_held, y_held, args.seed)  # the stored float16 weights
    save_speech_classifier(model, args.out, {**meta, **{k: json_number(v) for k, v in scores.items()}})
    for k, v in scores.items():
        print(f"{k}: {v}")
    print(f"-> {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} kB)")


def json_number(v):
    return f"{v:.4f}" if isinstance(v, float) else {k: round(u, 4) for k, u in v.items()}


if __name__ == "__main__":
    main()
