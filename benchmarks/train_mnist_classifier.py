"""Train the MNIST classifier that ships with ddpmlab (features for the "classifier FID").

    python benchmarks/train_mnist_classifier.py                  # writes ddpmlab/evaluate/assets/mnist_classifier.safetensors
    python benchmarks/train_mnist_classifier.py --out c.safetensors --epochs 30

Trains on the bundled MNIST ``train`` split (4,500 digits) with small random affine
augmentation and random brightness/contrast/noise (so that the features describe digit
shapes, not background noise), then measures accuracy on the held-out ``test`` split (500 digits) with
the weights exactly as stored (float16) and records it in the file's metadata.
Everything random is seeded: a rerun reproduces the shipped accuracy (~5 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from ddpmlab.data import load_mnist
from ddpmlab.evaluate.classifier import WEIGHTS, MNISTClassifier, accuracy, load_classifier, save_classifier


def augment(x: torch.Tensor, gen: torch.Generator, degrees: float = 10.0, shift: float = 2.0,
            scale: float = 0.1) -> torch.Tensor:
    """Random rotation, scaling and translation of a batch (B, 1, 28, 28) in [-1, 1]; background stays -1."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(degrees)
    s = 1 + (torch.rand(b, generator=gen) * 2 - 1) * scale
    t = (torch.rand(b, 2, generator=gen) * 2 - 1) * (2 * shift / x.shape[-1])  # pixels -> [-1, 1] units
    cos, sin = torch.cos(angle) / s, torch.sin(angle) / s
    theta = torch.stack([torch.stack([cos, -sin, t[:, 0]], 1), torch.stack([sin, cos, t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # grid_sample pads with 0, so move the background (-1) to 0 first
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def corrupt(x: torch.Tensor, gen: torch.Generator, max_offset: float = 0.3, max_noise: float = 0.3) -> torch.Tensor:
    """Random brightness, contrast and clamped Gaussian noise on half of a batch (B, 1, 28, 28).

    Generated digits are rarely as clean as the data (grey backgrounds, speckles); without
    this a background lifted by 0.1 turns almost every digit into an "8", and the features
    would measure background noise instead of digit shapes.
    """
    b = x.shape[0]
    pick = (torch.rand(b, 1, 1, 1, generator=gen) < 0.5).float()
    gain = 0.7 + 0.5 * torch.rand(b, 1, 1, 1, generator=gen)
    offset = max_offset * torch.rand(b, 1, 1, 1, generator=gen)
    sigma = max_noise * torch.rand(b, 1, 1, 1, generator=gen)
    y = gain * (x + 1) - 1 + offset + sigma * torch.randn(x.shape, generator=gen)
    return pick * y.clamp(-1, 1) + (1 - pick) * x


def train(epochs: int, batch_size: int, lr: float, seed: int) -> MNISTClassifier:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = load_mnist("train")
    model = MNISTClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps = epochs * math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(corrupt(augment(x[idx], gen), gen)), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1:2d}/{epochs}  loss {total / len(x):.4f}  ({time.time() - t0:.0f} s)", flush=True)
    return model.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(WEIGHTS), help=f"output safetensors file (default {WEIGHTS})")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = train(args.epochs, args.batch_size, args.lr, args.seed)
    x_test, y_test = load_mnist("test")
    meta = {"config": {"width": 32, "num_features": 128, "num_classes": 10, "dropout": 0.3},
            "script": "benchmarks/train_mnist_classifier.py", "train_split": "mnist train (4500)",
            "test_split": "mnist test (500)", "epochs": args.epochs, "batch_size": args.batch_size,
            "lr": args.lr, "seed": args.seed}
    save_classifier(model, args.out, {**meta, "test_accuracy": "pending"})
    acc = accuracy(load_classifier(args.out), x_test, y_test)  # the stored (float16) weights
    # the same digits with a grey, noisy background (background lifted by 0.1, noise sigma 0.1)
    g = torch.Generator().manual_seed(1234)
    noisy = (x_test + 0.1 + 0.1 * torch.randn(x_test.shape, generator=g)).clamp(-1, 1)
    acc_noisy = accuracy(load_classifier(args.out), noisy, y_test)
    save_classifier(model, args.out, {**meta, "test_accuracy": f"{acc:.4f}", "test_accuracy_noisy": f"{acc_noisy:.4f}"})
    print(f"test accuracy {acc:.4f} ({round(acc * len(y_test))}/{len(y_test)}), with a grey noisy background "
          f"{acc_noisy:.4f} -> {args.out}")


if __name__ == "__main__":
    main()
