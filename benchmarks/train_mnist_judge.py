"""Train the digit judge that ships with ddpmlab: an MNIST classifier with an 11th class, "reject".

    OMP_NUM_THREADS=1 python benchmarks/train_mnist_judge.py    # -> ddpmlab/evaluate/assets/mnist_judge.safetensors
    python benchmarks/train_mnist_judge.py --out /tmp/j.safetensors --epochs 4

Half of every batch are the bundled MNIST ``train`` digits (4,500), part of them with light
augmentation (rotation, scale, shift, ink gain, a little blur, a background lifted by at most
3/255), the other half degraded images labelled "reject" (class 10), in equal shares of seven
families (:data:`FAMILIES`): pure Gaussian or uniform noise; blobs and smooth random fields;
digits on a grey background (offset 16/255 to 0.7 of full scale, flat or uneven); the same with
grain; digits buried in heavy noise (sigma 0.45-1.5 on the [-1, 1] scale); two digits of
different classes overlaid; random scribbles (chains of 5-8 straight strokes, or 2-3 separate
ones, 2-4 pixels wide). No label smoothing: confidence is what the judge is read by.

Then, with the weights exactly as stored (float16), it measures on held-out images: the 500
bundled ``test`` digits (accuracy over the ten digits, confident share p >= 0.8, accuracy of the
confident ones) and each reject family made from the test digits with a seed the training never
used (confident share), beside the shipped 10-class classifier's confident share of the same
images, and records them in the file's metadata. Everything random is seeded; 10 epochs take
about 2.5 minutes on one CPU thread (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_mnist_classifier import augment  # the classifier's affine augmentation

from ddpmlab.data import load_mnist
from ddpmlab.evaluate.classifier import MNISTClassifier, load_classifier, load_mnist_classifier, save_classifier
from ddpmlab.evaluate.judges import JUDGE_WEIGHTS, REJECT, honest_confident, judge_probabilities

CONFIG = {"width": 24, "num_features": 96, "num_classes": 11, "dropout": 0.2}
GREY = 255.0  # offsets below are in 1/255 of full scale; the [-1, 1] scale doubles them


def _u(b: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    """(b, 1, 1, 1) uniform in [lo, hi)."""
    return lo + (hi - lo) * torch.rand(b, 1, 1, 1, generator=gen)


def _pick(b: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return (torch.rand(b, 1, 1, 1, generator=gen) < p).float()


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur of each image (B, 1, H, W) with its own sigma (B,) in pixels (0: unchanged)."""
    r = torch.arange(-3, 4, dtype=x.dtype)
    k = torch.exp(-r[None] ** 2 / (2 * sigma.clamp_min(1e-3)[:, None] ** 2))
    k = k / k.sum(1, keepdim=True)  # (B, 7)
    b = x.shape[0]
    y = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate").reshape(1, b, x.shape[2], -1), k[:, None, None, :],
                 groups=b)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), k[:, None, :, None], groups=b)
    return y.reshape(x.shape)


def smooth_field(b: int, gen: torch.Generator, size: int = 28) -> torch.Tensor:
    """(b, 1, size, size) smooth random fields in [0, 1]: noise on a 2-7 pixel grid, upsampled bicubically."""
    out = []
    for _ in range(b):
        g = int(torch.randint(2, 8, (1,), generator=gen))
        f = F.interpolate(torch.randn(1, 1, g, g, generator=gen), size=(size, size), mode="bicubic",
                          align_corners=False)
        out.append((f - f.min()) / (f.max() - f.min() + 1e-6))
    return torch.cat(out)


def clean_digits(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """What a good sample may look like, each change on part of the batch: affine jitter (60 %), ink gain
    0.7-1.2 (50 %), light blur (20 %), a background lifted by at most 3/255 with faint grain (50 %).
    A part stays as the data are: sharp digits on exact black must not look unusual."""
    b = x.shape[0]
    x = torch.where(_pick(b, 0.6, gen).bool(), augment(x, gen), x)
    gain = torch.where(_pick(b, 0.5, gen).bool(), _u(b, 0.7, 1.2, gen), torch.ones(b, 1, 1, 1))
    x = (gain * (x + 1) - 1).clamp(-1, 1)
    x = torch.where(_pick(b, 0.2, gen).bool(), _blur(x, _u(b, 0.3, 0.8, gen).flatten()), x)
    lift = 2 * _u(b, 0, 3 / GREY, gen)
    faint = (x + lift * (1 - x) / 2 + 0.02 * _u(b, 0, 1, gen) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
    return torch.where(_pick(b, 0.5, gen).bool(), faint, x)


def noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Pure Gaussian (any mean, sigma 0.1-1.2) or uniform noise (any range): nothing of the digit."""
    b = x.shape[0]
    g = _u(b, -1, 0.6, gen) + _u(b, 0.1, 1.2, gen) * torch.randn(x.shape, generator=gen)
    lo = _u(b, -1, 0.6, gen)
    u = lo + (1 - lo) * _u(b, 0.2, 1, gen) * torch.rand(x.shape, generator=gen)
    return torch.where(_pick(b, 0.5, gen).bool(), g, u).clamp(-1, 1)


def blobs(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """1-5 soft Gaussian blobs on black, or a smooth random field (flat, or cut at a random level)."""
    b, size = x.shape[0], x.shape[-1]
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    img = torch.zeros(b, 1, size, size)
    k = torch.randint(1, 6, (b,), generator=gen)
    for j in range(5):
        c = 4 + 20 * torch.rand(b, 2, generator=gen)
        s = 2.5 + 4.5 * torch.rand(b, 2, generator=gen)  # per axis: round or mildly elongated
        bump = torch.exp(-((xx - c[:, 0, None, None]) ** 2 / (2 * s[:, 0, None, None] ** 2)
                           + (yy - c[:, 1, None, None]) ** 2 / (2 * s[:, 1, None, None] ** 2)))
        img += ((j < k).float()[:, None, None] * (0.5 + 0.5 * torch.rand(b, 1, 1, generator=gen)) * bump)[:, None]
    blob = 2 * img.clamp(0, 1) - 1
    field = smooth_field(b, gen, size)
    cut = (field > _u(b, 0.3, 0.7, gen)).float()
    field = torch.where(_pick(b, 0.5, gen).bool(), field, cut)
    field = _u(b, -1, -0.2, gen) + _u(b, 0.3, 2, gen) * field
    return torch.where(_pick(b, 0.5, gen).bool(), blob, field.clamp(-1, 1))


def grey_background(x: torch.Tensor, gen: torch.Generator, grain: bool = False) -> torch.Tensor:
    """Digits on a background lifted by 16/255 to 0.7 of full scale (flat or uneven), with grain if asked."""
    b = x.shape[0]
    x = clean_digits(x, gen)
    offset = 2 * torch.exp(_u(b, math.log(16 / GREY), math.log(0.7), gen))  # log-uniform, the [-1, 1] scale
    uneven = offset * (0.4 + 1.2 * smooth_field(b, gen, x.shape[-1]))
    offset = torch.where(_pick(b, 0.3, gen).bool(), uneven, offset)
    lifted = x + offset * (1 - x) / 2  # the ink stays white
    added = x + offset
    y = torch.where(_pick(b, 0.5, gen).bool(), lifted, added)
    if grain:
        y = y + _u(b, 0.04, 0.45, gen) * torch.randn(x.shape, generator=gen)
    return y.clamp(-1, 1)


def grey_grainy(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    return grey_background(x, gen, grain=True)


def heavy_noise(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Digits buried in Gaussian noise of sigma 0.45-1.5 (the [-1, 1] scale)."""
    b = x.shape[0]
    return (clean_digits(x, gen) + _u(b, 0.45, 1.5, gen) * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def overlaid(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Each digit with another of a different class on top (the brighter pixel wins), each jittered."""
    b = x.shape[0]
    other = torch.randperm(b, generator=gen)
    same = y[other] == y
    other[same] = torch.roll(torch.arange(b), 1)[same]  # a few may still match: they are rare
    return torch.maximum(clean_digits(x, gen), clean_digits(x[other], gen))


def scribbles(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Chains of 5-8 straight strokes that turn at random, or 2-3 separate strokes, 2-4 pixels wide."""
    b, size = x.shape[0], x.shape[-1]
    pix = torch.stack(torch.meshgrid(torch.arange(size, dtype=torch.float32),
                                     torch.arange(size, dtype=torch.float32), indexing="xy"), -1).reshape(-1, 2)
    n = 9
    pts = torch.empty(b, n, 2)
    pts[:, 0] = 4 + 20 * torch.rand(b, 2, generator=gen)
    angle = 2 * math.pi * torch.rand(b, generator=gen)
    for i in range(1, n):
        angle = angle + (torch.rand(b, generator=gen) * 2 - 1) * math.radians(150)
        step = 5 + 7 * torch.rand(b, generator=gen)
        v = pts[:, i - 1] - 3 + step[:, None] * torch.stack([angle.cos(), angle.sin()], 1)
        span = size - 7.0
        v = v.remainder(2 * span)
        pts[:, i] = 3 + torch.where(v > span, 2 * span - v, v)  # bounce off the edges
    separate = torch.rand(b, generator=gen) < 0.3
    jumps = 2 + 20 * torch.rand(b, n, 2, generator=gen)  # separate strokes: each starts anew
    ends = (jumps + 10 * torch.randn(b, n, 2, generator=gen)).clamp(2, size - 3)
    a = torch.where(separate[:, None, None], jumps[:, :-1], pts[:, :-1])  # (b, S, 2) strokes from a to c
    c = torch.where(separate[:, None, None], ends[:, :-1], pts[:, 1:])
    count = torch.where(separate, torch.randint(2, 4, (b,), generator=gen), torch.randint(5, 9, (b,), generator=gen))
    d = c - a
    t = (((pix[None, None] - a[:, :, None]) * d[:, :, None]).sum(-1) / (d.pow(2).sum(-1)[..., None] + 1e-6)).clamp(0, 1)
    dist = (pix[None, None] - (a[:, :, None] + t[..., None] * d[:, :, None])).norm(dim=-1)  # (b, S, P)
    live = torch.arange(n - 1)[None] < count[:, None]
    dist = torch.where(live[..., None], dist, torch.full_like(dist, 99.0)).amin(1)
    width = 0.5 + 1.0 * torch.rand(b, 1, generator=gen)
    ink = (1 - (dist - width)).clamp(0, 1) * (0.7 + 0.3 * torch.rand(b, 1, generator=gen))
    return (2 * ink - 1).reshape(b, 1, size, size)


FAMILIES = {
    "noise": lambda x, y, g: noise(x, g),
    "blobs": lambda x, y, g: blobs(x, g),
    "grey background": lambda x, y, g: grey_background(x, g),
    "grey grainy background": lambda x, y, g: grey_grainy(x, g),
    "heavy noise": lambda x, y, g: heavy_noise(x, g),
    "two digits": overlaid,
    "scribbles": lambda x, y, g: scribbles(x, g),
}


def rejects(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As many degraded images as ``x`` (B, 1, 28, 28), the seven families in turn."""
    parts = torch.arange(len(x)) % len(FAMILIES)
    out = torch.empty_like(x)
    for k, fn in enumerate(FAMILIES.values()):
        idx = (parts == k).nonzero().flatten()
        if len(idx):
            out[idx] = fn(x[idx], y[idx], gen)
    return out


def train(epochs: int, batch_size: int, lr: float, seed: int, smoothing: float) -> MNISTClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_mnist("train")
    model = MNISTClassifier(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    half = batch_size // 2
    per_epoch = math.ceil(len(x) / half)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * per_epoch)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), half):
            idx = perm[i:i + half]
            bad = torch.randint(0, len(x), (len(idx),), generator=gen)
            inputs = torch.cat([clean_digits(x[idx], gen), rejects(x[bad], y[bad], gen)])
            labels = torch.cat([y[idx], torch.full((len(idx),), REJECT)])
            loss = F.cross_entropy(model(inputs), labels, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}  ({time.time() - t0:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def held_out_figures(judge: MNISTClassifier, seed: int = 1234) -> dict:
    """The judge (and the shipped classifier, beside it) on the test digits and on each reject family."""
    x, y = load_mnist("test")
    old = load_mnist_classifier()
    p = judge_probabilities(x, judge)
    confident = honest_confident(p)
    right = p[:, :REJECT].argmax(1) == y
    out = {"test_accuracy": float(right.float().mean()), "test_confident": float(confident.float().mean()),
           "test_confident_accuracy": float(right[confident].float().mean()),
           "classifier_test_confident": float((old(x).softmax(1).max(1).values >= 0.8).float().mean())}
    gen = torch.Generator().manual_seed(seed)
    for name, fn in FAMILIES.items():
        bad = fn(x, y, gen)
        out[f"reject_confident/{name}"] = float(honest_confident(judge_probabilities(bad, judge)).float().mean())
        out[f"classifier_confident/{name}"] = float((old(bad).softmax(1).max(1).values >= 0.8).float().mean())
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(JUDGE_WEIGHTS), help=f"output safetensors file (default {JUDGE_WEIGHTS})")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="digits and rejects, half each")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    args = p.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.time()
    model = train(args.epochs, args.batch_size, args.lr, args.seed, args.label_smoothing)
    meta = {"config": CONFIG, "script": "benchmarks/train_mnist_judge.py", "classes": "0-9 digits, 10 reject",
            "train_split": "mnist train (4500) + as many degraded images", "test_split": "mnist test (500)",
            "reject_families": list(FAMILIES), "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
            "label_smoothing": args.label_smoothing, "seed": args.seed, "train_seconds": round(time.time() - t0)}
    save_classifier(model, args.out, {**meta, "held_out": "pending"})
    figures = held_out_figures(load_classifier(args.out))  # the stored (float16) weights
    save_classifier(model, args.out, {**meta, "held_out": {k: round(v, 4) for k, v in figures.items()}})
    print(json.dumps(figures, indent=1))
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e3:.0f} KB)")


if __name__ == "__main__":
    main()
