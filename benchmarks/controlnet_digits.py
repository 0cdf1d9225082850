"""ControlNet on the default digits run: does a sample follow the edges it is given?

1. Trains a ControlNet with edge control on BASE (`ddpm train-controlnet BASE controlnet.detector=edges
   data.split=train train.steps=--steps`, fp32, no drawings but the final one), timed:
   the training wall-clock is the whole call (set-up, training steps, final drawing).  --controlnet CN_RUN skips it.
2. Takes --n held-out digits (the bundled MNIST's test split, spread over it), their edges (the same detector, the
   run's controlnet.edge_threshold) as the controls, and draws one sample per control with the run's own sampler
   and steps, with the ControlNet and with the base alone, from the same noise.  Labels (--labels): none (default;
   the "no label" row of a class-conditional base, so only the control says which digit) or the digits' own with
   the run's guidance.
3. Scores each sample by edge F1 against its control: the sample's own edges (the same detector) against the
   control's edge pixels with a tolerance of 1 pixel (Chebyshev distance 1, the 3x3 neighbourhood): precision is
   the share of the sample's edge pixels within 1 pixel of a control edge pixel, recall the share of the control's
   edge pixels within 1 pixel of a sample edge pixel, F1 = 2PR / (P + R) (0 when a side has no edge pixel), per
   sample and then averaged; the pooled F1 (all pixels of all samples counted together) is printed beside it, and
   the same F1 without the tolerance (an edge pixel must fall on an edge pixel).  The row "another real digit"
   scores the edges of another held-out digit against each control: what the measure gives by chance (MNIST
   digits are centred and thick, so their edges overlap: about 0.75 with the tolerance, 0.28 without).
   --anywhere moves each held-out digit to a uniformly drawn place where its bounding box (the pixels brighter than
   black) stays wholly in the frame, before its edges are taken: the base draws centred digits, so such controls
   are what it matches only by chance, while a ControlNet that follows its control follows it anywhere (it is
   trained on the centred training digits alone).

Prints a markdown table and writes it with the numbers (JSON) and a picture (controls, with, without) to --out.

    python benchmarks/controlnet_digits.py runs/mnist-20261201-120000 --steps 1500
    python benchmarks/controlnet_digits.py BASE --controlnet BASE-controlnet-edges-... --n 500
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddpmlab.data import load_mnist  # noqa: E402
from ddpmlab.data.control import edges  # noqa: E402
from ddpmlab.io.images import save_grid  # noqa: E402
from ddpmlab.models.controlnet import ControlledUNet  # noqa: E402
from ddpmlab.runs import Run, SamplingRequest, draw_samples, load_run, plan_request  # noqa: E402
from ddpmlab.runs.control import load_controlnet  # noqa: E402
from ddpmlab.training.tasks.controlnet import train_controlnet  # noqa: E402


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def within_one_pixel(e: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) in {0, 1} -> the pixels at Chebyshev distance <= 1 of an edge pixel (a 3x3 dilation)."""
    return F.max_pool2d(e, 3, stride=1, padding=1)


def edge_f1(sample_edges: torch.Tensor, control_edges: torch.Tensor, tolerance: int = 1) -> dict:
    """Edge F1 with a 1-pixel tolerance (see the module's docstring; 0: the same pixel): per-sample mean and pooled,
    with P and R."""
    near = within_one_pixel if tolerance else (lambda e: e)
    hit_p = (sample_edges * near(control_edges)).flatten(1).sum(1)
    hit_r = (control_edges * near(sample_edges)).flatten(1).sum(1)
    n_s, n_c = sample_edges.flatten(1).sum(1), control_edges.flatten(1).sum(1)
    p, r = hit_p / n_s.clamp(min=1), hit_r / n_c.clamp(min=1)
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp(min=1e-12), torch.zeros_like(p))
    pp, pr = hit_p.sum() / n_s.sum().clamp(min=1), hit_r.sum() / n_c.sum().clamp(min=1)
    return {"f1": f1.mean().item(), "precision": p.mean().item(), "recall": r.mean().item(),
            "pooled_f1": (2 * pp * pr / (pp + pr).clamp(min=1e-12)).item()}


def moved_anywhere(images: torch.Tensor, seed: int) -> torch.Tensor:
    """Images (N, C, H, W) on black (-1), each digit moved by whole pixels to a uniformly drawn place where its
    bounding box (pixels above -1) stays in the frame (a seeded draw)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.full_like(images, -1.0)
    h, w = images.shape[-2:]
    for k, x in enumerate(images):
        rows, cols = (x > -1).any(0).any(1).nonzero()[:, 0], (x > -1).any(0).any(0).nonzero()[:, 0]
        if not len(rows):
            out[k] = x
            continue
        bh, bw = int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1
        top, left = (int(torch.randint(0, size - box + 1, (1,), generator=g)) for size, box in ((h, bh), (w, bw)))
        out[k, :, top:top + bh, left:left + bw] = x[:, rows[0]:rows[0] + bh, cols[0]:cols[0] + bw]
    return out


def draw(base: Run, controlnet, controls: torch.Tensor, labels, seed: int, batch: int = 250) -> torch.Tensor:
    """One sample per control (with ``controlnet``, or the base alone when None), in batches of the same noise."""
    out = []
    for b, start in enumerate(range(0, len(controls), batch)):
        c = controls[start:start + batch]
        model = base.model if controlnet is None else ControlledUNet(base.model, [(controlnet, c, 1.0)])
        run = Run(base.cfg, model, base.schedule, base.device, base.dir, class_names=base.class_names)
        own = labels is not None or not base.num_classes
        request = SamplingRequest(n=len(c), seed=seed + b, guidance=None if own else 0.0)  # 0: the "no label" row
        plan = plan_request(run, request, log=lambda m: None)
        if labels is not None and plan.labels is not None:
            plan.labels = labels[start:start + batch]
        out.append(draw_samples(run, plan, progress=False))
    return torch.cat(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="a digits run (the default `ddpm train` run)")
    p.add_argument("--steps", type=int, default=1500, help="the ControlNet's training steps (default 1500)")
    p.add_argument("--minutes", type=float, default=None, help="or a wall-clock budget (train.minutes)")
    p.add_argument("--controlnet", default=None, metavar="CN_RUN", help="score this ControlNet run, train none")
    p.add_argument("--n", type=int, default=500, help="held-out digits, one sample each (default 500)")
    p.add_argument("--labels", choices=["none", "own"], default="none", help="none (default) or the digits' own")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--anywhere", action="store_true", help="move each control's digit to a random place in the frame")
    p.add_argument("--out", default=None, help="output folder (default BASE/bench/controlnet)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="more train-controlnet keys")
    args = p.parse_args(argv)
    out = Path(args.out or Path(args.base) / "bench" / "controlnet")
    out.mkdir(parents=True, exist_ok=True)
    seconds = None
    cn_dir = args.controlnet
    if cn_dir is None:
        budget = [f"train.minutes={args.minutes}"] if args.minutes else ["train.minutes=null"]
        keys = ["controlnet.detector=edges", "data.split=train", f"train.steps={args.steps}", *budget,
                "train.mixed_precision=no", "train.sample_every=0", "train.eval_every=0", f"train.out_dir={out}",
                "train.name=controlnet", *args.overrides]
        t0 = time.perf_counter()
        cn_dir = train_controlnet(args.base, keys, progress=False)
        seconds = time.perf_counter() - t0
    cfg, net = load_controlnet(cn_dir, "ema", "cpu")
    base = load_run(args.base, "ema", "cpu")
    real, y = load_mnist("test")
    pick = [i * len(real) // min(args.n, len(real)) for i in range(min(args.n, len(real)))]
    digits = moved_anywhere(real[pick], args.seed) if args.anywhere else real[pick]
    controls = edges(digits, cfg.controlnet.edge_threshold)
    labels = y[pick].long() if args.labels == "own" else None
    rows, pictures = {}, []
    shown = torch.linspace(0, len(pick) - 1, 16).long()  # 16 controls spread over the digits in the picture
    for name, controlnet in (("with the ControlNet", net), ("base alone", None)):
        t0 = time.perf_counter()
        x = draw(base, controlnet, controls, labels, args.seed)
        e = edges(x, cfg.controlnet.edge_threshold)
        rows[name] = {**edge_f1(e, controls), "f1_exact": edge_f1(e, controls, 0)["f1"],
                      "sampling_s": time.perf_counter() - t0}
        pictures.append(x[shown])
    others = real[[(i + 7) % len(real) for i in pick]]
    others = moved_anywhere(others, args.seed + 1) if args.anywhere else others
    other = edges(others, cfg.controlnet.edge_threshold)  # chance: another digit
    rows["another real digit (chance)"] = {**edge_f1(other, controls), "f1_exact": edge_f1(other, controls, 0)["f1"],
                                           "sampling_s": 0.0}
    save_grid(torch.cat([controls[shown] * 2 - 1, *pictures]), out / "controlnet_digits.png", nrow=16, scale=2)
    steps = cfg.train.steps
    lines = ["| model | edge F1 (same pixel) | edge F1 (1 px) | precision | recall | pooled F1 | sampling (s) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v['f1_exact']:.3f} | {v['f1']:.3f} | {v['precision']:.3f} | {v['recall']:.3f} | "
              f"{v['pooled_f1']:.3f} | {v['sampling_s']:.0f} |" for k, v in rows.items()]
    note = (f"ControlNet: {steps} training steps in {seconds:.0f} s (wall-clock of train-controlnet)" if seconds
            else f"ControlNet: {cn_dir} ({steps} training steps)")
    placed = "moved anywhere in the frame" if args.anywhere else "centred"
    text = "\n".join(lines) + (f"\n\n{note}; {len(pick)} held-out digits, {placed}, labels {args.labels}; "
                               f"CPU: {cpu_name()}\n")
    print(text)
    (out / "controlnet_digits.md").write_text(text)
    (out / "controlnet_digits.json").write_text(json.dumps(
        {"rows": rows, "train_seconds": seconds, "steps": steps, "n": len(pick), "labels": args.labels,
         "anywhere": args.anywhere, "controlnet": str(cn_dir), "base": args.base, "cpu": cpu_name(),
         "threads": torch.get_num_threads()},
        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
