"""Train the coloured-shapes classifier that ships with ddpmlab (the features of the shapes set's classifier-FID).

    python benchmarks/train_shapes_classifier.py       # -> ddpmlab/evaluate/assets/shapes_classifier.safetensors
    python benchmarks/train_shapes_classifier.py --steps 200 --out c.safetensors

Every batch is drawn afresh by the set's own generator (:func:`ddpmlab.data.shapes.generate`): classes uniform over
all 432 (the colour-shape pairs a text run's folder holds out included), jitter as the set draws it; half the batch
gets Gaussian noise (standard deviation up to 0.15 on the [-1, 1] scale) and a dimming of up to 15 %, so that a
model's nearly-right samples read as what they show.  The loss is the four heads' cross-entropies summed.

Then, with the weights exactly as stored (float16), it measures on a held-out draw (seed 12345, 2,000 images) the
accuracy per attribute and on all four (all classes, and the held-out pairs alone), and the FID (:mod:`ddpmlab
.evaluate.metrics`) against a second real draw of: another real draw, Gaussian noise, black images, and the first
draw colour-swapped (its channels rotated, which moves every palette colour to another one), each at n = 2,000 and
at n = 200 (the tests' size); all of it goes into the file's metadata with the steps, the wall clock and the CPU.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.data.shapes import ATTRIBUTES, VALUES, ShapesSpec, generate, held_out_classes
from ddpmlab.evaluate.classifier import save_classifier
from ddpmlab.evaluate.metrics import feature_sums, fid
from ddpmlab.evaluate.shapes_classifier import (
    WEIGHTS,
    ShapesClassifier,
    attribute_accuracy,
    load_shapes_classifier,
)

CONFIG = {"width": 16, "num_features": 128, "dropout": 0.2}
SPEC = ShapesSpec()
EVAL_SEED = 12345


def draw(classes: np.ndarray, seed: int) -> torch.Tensor:
    """Images of ``classes`` as the set draws them: (N, 3, 32, 32) in [-1, 1]."""
    x = torch.from_numpy(generate(SPEC, classes, size=32, seed=seed)).permute(0, 3, 1, 2)
    return x.float() / 127.5 - 1


def targets(classes: np.ndarray) -> torch.Tensor:
    """(N, 4) value index per attribute of each class."""
    return torch.tensor([[VALUES[a].index(SPEC.attributes(int(c))[a]) for a in ATTRIBUTES] for c in classes])


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the images: dimmed by up to 15 % and Gaussian noise of standard deviation up to 0.15."""
    n = len(x)
    on = (torch.rand(n, 1, 1, 1, generator=gen) < 0.5).float()
    dim = 1 - 0.15 * torch.rand(n, 1, 1, 1, generator=gen) * on
    sigma = 0.15 * torch.rand(n, 1, 1, 1, generator=gen) * on
    return (x + 1) * dim - 1 + sigma * torch.randn(x.shape, generator=gen)


def train(steps: int, batch_size: int, lr: float, seed: int) -> ShapesClassifier:
    torch.manual_seed(seed)
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    model = ShapesClassifier(**CONFIG)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    t0, total = time.time(), 0.0
    for step in range(1, steps + 1):
        classes = rng.integers(SPEC.num_classes, size=batch_size)
        x, y = augment(draw(classes, seed=int(rng.integers(2 ** 31))), gen), targets(classes)
        heads = model(x)
        loss = sum(F.cross_entropy(heads[a], y[:, j]) for j, a in enumerate(ATTRIBUTES))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
        if step % 100 == 0 or step == steps:
            print(f"step {step}/{steps}: loss {total / min(step, 100):.4f} ({time.time() - t0:.0f} s)", flush=True)
            total = 0.0
    return model.eval()


@torch.no_grad()
def feats(net: ShapesClassifier, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([net.features(b) for b in x.split(500)])


WARM = ("red", "yellow", "green")  # the colour-swap check's palette half: rotated, it becomes green, cyan, blue


def warm_classes() -> np.ndarray:
    return np.array([i for i in range(SPEC.num_classes) if SPEC.attributes(i)["colour"] in WARM])


@torch.no_grad()
def measure(net: ShapesClassifier) -> dict:
    """Accuracy on a held-out draw and the FID of real, noise, black and colour-swapped images (module docstring)."""
    rng = np.random.default_rng(EVAL_SEED)
    classes = rng.integers(SPEC.num_classes, size=2000)
    x = draw(classes, EVAL_SEED)
    held = rng.choice(np.asarray(held_out_classes(SPEC)), size=1000)
    out = {"accuracy": attribute_accuracy(net, x, targets(classes)),
           "accuracy_held_out_pairs": attribute_accuracy(net, draw(held, EVAL_SEED + 1), targets(held))}
    everything = {"reference": draw(rng.integers(SPEC.num_classes, size=2000), EVAL_SEED + 2),
                  "real": draw(rng.integers(SPEC.num_classes, size=2000), EVAL_SEED + 3)}
    warm = {"reference": draw(rng.choice(warm_classes(), 2000), EVAL_SEED + 4),
            "real": draw(rng.choice(warm_classes(), 2000), EVAL_SEED + 5)}
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(EVAL_SEED)).clamp(-1, 1)
    for n in (2000, 200):
        ref, ref_warm = (feature_sums(feats(net, s["reference"][:n])) for s in (everything, warm))
        out[f"fid_n{n}"] = {"real": fid(ref, feats(net, everything["real"][:n])), "noise": fid(ref, feats(net, noise[:n])),
                            "black": fid(ref, feats(net, -torch.ones_like(x[:n]))),
                            "real_warm": fid(ref_warm, feats(net, warm["real"][:n])),
                            "colour_swapped_warm": fid(ref_warm, feats(net, warm["real"][:n, [2, 0, 1]]))}
        out[f"fid_n{n}"] = {k: round(v, 3) for k, v in out[f"fid_n{n}"].items()}
    return out


def cpu() -> str:
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} thread(s), torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1200, help="training steps (default 1200: ~4 min on one thread)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(WEIGHTS), help="where to write the weights (default: the shipped file)")
    args = ap.parse_args()
    t0 = time.time()
    model = train(args.steps, args.batch_size, args.lr, args.seed)
    seconds = round(time.time() - t0, 1)
    path = save_classifier(model, args.out, {"config": CONFIG, "steps": args.steps, "batch_size": args.batch_size,
                                             "seed": args.seed, "train_seconds": seconds, "cpu": cpu(),
                                             "commit": commit()})
    net = load_shapes_classifier(path=path)  # the weights as stored (float16)
    found = measure(net)
    meta = {**net.metadata, **{k: v for k, v in found.items()}}
    save_classifier(net, path, meta)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB) after {seconds} s on {cpu()}")
    for k, v in found.items():
        print(f"{k}: {v}")


if __name__ == "__main__":
    main()
