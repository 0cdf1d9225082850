"""LoRA against full fine-tuning: teach a trained digits run a new style from 100 images.

The new style is "bold italic": each digit sheared by --shear (x += shear * y) and its strokes thickened by a
3x3 dilation. The benchmark writes 100 styled digits (10 of each class, from the bundled MNIST training split) as
a class folder, fine-tunes the base run on it twice for the same number of steps (`ddpm finetune BASE --method
lora`, then `--method full`), draws --n samples from the base run and from each fine-tuned run (the classes in
turn, each run's own sampler, steps and guidance) and scores them with two independent measures:

    style   a judge the benchmark trains (a small CNN: plain against styled digits, 2,000 each from the
            training split, none of the 100); its accuracy on the held-out test split is printed first
    kept    the shipped MNIST classifier on the asked label (is the digit still the digit it was asked for?),
            and that accuracy as a share of the base run's
    size    the adapter file against the full model's weights (fp32)

    python benchmarks/lora_style.py runs/mnist-...               # the default digits run
    python benchmarks/lora_style.py runs/mnist-... --steps 150 --n 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.data import load_mnist  # noqa: E402
from ddpmlab.evaluate.classifier import MNISTClassifier, accuracy, load_mnist_classifier  # noqa: E402
from ddpmlab.io.images import save_grid  # noqa: E402
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request  # noqa: E402


def stylise(x: torch.Tensor, shear: float) -> torch.Tensor:
    """Bold italic digits: (N,1,28,28) in [-1,1] sheared (x' = x + shear * y, y pointing down) and dilated."""
    theta = torch.tensor([[1.0, shear, 0.0], [0.0, 1.0, 0.0]]).expand(len(x), 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    sheared = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    return F.max_pool2d(sheared, 3, stride=1, padding=1)


def write_folder(x: torch.Tensor, y: torch.Tensor, out: Path) -> None:
    for i, (img, label) in enumerate(zip(x, y)):
        d = out / str(int(label))
        d.mkdir(parents=True, exist_ok=True)
        pixels = ((img[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
        Image.fromarray(pixels).save(d / f"{i:04d}.png")


def few_per_class(y: torch.Tensor, per_class: int) -> torch.Tensor:
    return torch.cat([torch.nonzero(y == k).flatten()[:per_class] for k in range(10)])


def train_judge(x: torch.Tensor, shear: float, epochs: int = 3, seed: int = 0) -> MNISTClassifier:
    """A plain-vs-styled CNN (2 classes) on ``x`` and its styled copy."""
    torch.manual_seed(seed)
    data = torch.cat([x, stylise(x, shear)])
    labels = torch.cat([torch.zeros(len(x)), torch.ones(len(x))]).long()
    judge = MNISTClassifier(width=16, num_features=64, num_classes=2)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    for _ in range(epochs):
        judge.train()
        for idx in torch.randperm(len(data)).split(64):
            loss = F.cross_entropy(judge(data[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return judge.eval()


def ddpm(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpmlab", *args], check=True)
    return time.perf_counter() - start


@torch.no_grad()
def scores(run_dir: Path, n: int, judge, classifier, out: Path) -> dict:
    run = load_run(run_dir, device="cpu")
    x = draw_samples(run, plan_request(run, SamplingRequest(n=n, seed=0)), progress=False).clamp(-1, 1)
    asked = torch.arange(n) % 10
    save_grid(x[:100], out / f"{run_dir.name}.png", nrow=10)
    styled = torch.cat([judge(b).argmax(1) for b in x.split(500)]).float().mean().item()
    return {"style": styled, "kept": accuracy(classifier, x, asked)}


def finetune(base: Path, method: str, args, out: Path) -> tuple[Path, float]:
    keys = ["data.dataset=folder", f"data.path={out / 'style'}", "data.channels=1", "data.image_size=28",
            f"train.steps={args.steps}", "train.minutes=null", "train.mixed_precision=no", f"train.lr={args.lr}",
            "train.ema_decay=0.98", "train.ema_start=0", "train.warmup_steps=0", f"train.batch_size={args.batch}",
            "train.sample_every=0", f"train.out_dir={out}", f"train.name={method}"]
    if method == "lora":
        keys += [f"lora.rank={args.rank}", f"lora.alpha={args.rank}", f"lora.target_modules=[{args.targets}]"]
    seconds = ddpm("finetune", str(base), "--method", method, *keys, "--no-progress")
    return out / method, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="a trained class-conditional digits run (ddpm train)")
    p.add_argument("--out", type=Path, default=Path("runs/lora_style"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="qkv,proj_out,conv1,conv2")
    p.add_argument("--shear", type=float, default=0.35)
    p.add_argument("--n", type=int, default=500)
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    x, y = load_mnist("train")
    few = few_per_class(y, 10)
    write_folder(stylise(x[few], args.shear), y[few], args.out / "style")
    rest = torch.ones(len(x), dtype=torch.bool)
    rest[few] = False
    judge = train_judge(x[rest][:2000], args.shear)
    xt, _ = load_mnist("test")
    judge_acc = 0.5 * (accuracy(judge, xt, torch.zeros(len(xt)).long())
                       + accuracy(judge, stylise(xt, args.shear), torch.ones(len(xt)).long()))
    print(f"style judge: accuracy {judge_acc:.3f} on the 500 test digits, plain and styled")
    classifier = load_mnist_classifier()
    save_grid(stylise(xt[:100], args.shear), args.out / "style_examples.png", nrow=10)
    rows = {"base": {**scores(args.base, args.n, judge, classifier, args.out), "seconds": 0.0}}
    model_bytes = sum(v.numel() * 4 for v in load_run(args.base, device="cpu").model.state_dict().values())
    for method in ("lora", "full"):
        run_dir, seconds = finetune(args.base, method, args, args.out)
        rows[method] = {**scores(run_dir, args.n, judge, classifier, args.out), "seconds": seconds}
        adapter = run_dir / "adapter.safetensors"
        rows[method]["bytes"] = adapter.stat().st_size if adapter.exists() else model_bytes
    base_kept = rows["base"]["kept"]
    lines = [f"steps {args.steps} of batch {args.batch}, lr {args.lr}, LoRA rank {args.rank} on {args.targets}; "
             f"{args.n} samples each; style judge accuracy {judge_acc:.3f}", "",
             "| model | new style (judge) | asked digit (classifier) | kept vs base | weights written | "
             "fine-tuning s |", "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        size = f"{r.get('bytes', model_bytes) / 1e6:.2f} MB ({r.get('bytes', model_bytes) / model_bytes:.1%})"
        lines.append(f"| {name} | {r['style']:.3f} | {r['kept']:.3f} | {r['kept'] / base_kept:.2f}x | {size} | "
                     f"{r['seconds']:.0f} |")
    print("\n".join(lines))
    (args.out / "lora_style.md").write_text("\n".join(lines) + "\n")
    (args.out / "lora_style.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                          "judge_accuracy": judge_acc, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
