"""Fast samplers on a real trained model: classifier-FID at 10 and 20 steps against 250 ancestral steps.

For one run of digit images (the bundled MNIST, or any 1-channel digit folder run, e.g. 16x16):
every sampler in --samplers (a ddpmlab sampler, optionally ``:step schedule``) at each of --steps,
and the reference, DDPM with --reference-steps (250) ancestral steps, each draws --n samples from
the same noise seeds (a class-conditional run: the classes in turn, with the run's own guidance
scale unless --guidance), scored with the shipped MNIST classifier as the feature network against
the 500 held-out test digits (quality_per_minute.py's scoring: classifier-FID, KID, confident share
p >= 0.8, which is high on pure noise too) and, as `ddpm eval --metrics judge,clean,rough` reports
them (ddpmlab.evaluate.judges.digit_quality), the honest confident share (the digit judge, which has a
reject class, calls it a digit with p >= 0.8) and its ratio to the real test digits' share, the
clean-background share (border darker than 20/255) and the rough share (rougher than every real test
digit at the run's size: the salt-and-pepper samples).  Images of another size are resized
(bilinear) to 28x28 for the classifier and the judge, the real digits the same way (down to the run's
size and back up), so both sides see the same blur; the real digits' row is printed beside.

Prints a markdown table with each FID's ratio to the reference and writes it and the numbers
(JSON) to --out.  Network evaluations (NFE) are per sample; guidance doubles them (one batched
call with and without the label).

    python benchmarks/fast_samplers.py runs/mnist-20261201-120000
    python benchmarks/fast_samplers.py RUN --samplers dpmpp_2m_sde,restart,ddim --steps 10,20 --n 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_per_minute import QUALITY_HEAD, cpu_name, quality_cells, score  # quality_per_minute.py's scoring

from ddpmlab.data import load_mnist
from ddpmlab.evaluate.features import batches, classifier_extractor, extract
from ddpmlab.evaluate.judges import digit_quality, to_digit_size
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request, run_guidance

DEFAULT_SAMPLERS = "dpmpp_2m_sde,restart,ddpm,dpmpp_2m,unipc,ddim"


def at_size(x: torch.Tensor, shape) -> torch.Tensor:
    """Digits (N, 1, 28, 28) resized (bilinear, antialiased) to a run's image ``shape`` (C, H, W)."""
    if tuple(x.shape[-2:]) == tuple(shape[-2:]):
        return x
    return F.interpolate(x, size=tuple(shape[-2:]), mode="bilinear", align_corners=False, antialias=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", metavar="RUN", help="a digit-image run folder (ddpm train)")
    p.add_argument("--samplers", default=DEFAULT_SAMPLERS, help=f"comma-separated (default {DEFAULT_SAMPLERS})")
    p.add_argument("--steps", default="10,20", help="sampler steps, comma-separated (default 10,20)")
    p.add_argument("--reference-steps", type=int, default=250, help="ancestral steps of the reference (default 250)")
    p.add_argument("--n", type=int, default=500, help="samples per sampler (default 500)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the run's own)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output folder (default RUN/bench)")
    args = p.parse_args(argv)
    run = load_run(args.run, "ema", args.device)
    if not run.is_image or run.image_shape[0] != 1:
        raise SystemExit(f"{args.run}: a run of 1-channel digit images is needed (the MNIST classifier scores them)")
    guidance = run_guidance(run, args.guidance, log=lambda m: None) if run.num_classes else None
    extractor = classifier_extractor("cpu")
    real, _ = load_mnist("test")
    small = at_size(real, run.image_shape)
    # the real digits at the run's size and back up, as the samples will be
    real_feats, _ = extract(extractor, batches(to_digit_size(small), 500), total=len(real), with_logits=True,
                            progress=False)
    real_row = digit_quality(small, small)
    cost = 2 if guidance is not None else 1
    jobs = [("ddpm", None, args.reference_steps)]
    for s in args.samplers.split(","):
        name, _, schedule = s.partition(":")
        jobs += [(name, schedule or None, int(k)) for k in args.steps.split(",")]
    rows = []
    for sampler, schedule, steps in jobs:
        t0 = time.perf_counter()
        plan = plan_request(run, SamplingRequest(sampler, steps, schedule, guidance=guidance, seed=args.seed, n=args.n),
                            log=lambda m: None)
        x = draw_samples(run, plan, args.n, seed=args.seed, progress=False)
        seconds = time.perf_counter() - t0
        r = score(to_digit_size(x), extractor, real_feats)
        r.update(sampler=sampler + (f":{schedule}" if schedule else ""), steps=steps, nfe=plan.steps * cost,
                 seconds=round(seconds, 1), **digit_quality(x, small))
        rows.append(r)
        print(f"{r['sampler']:>20s} {steps:4d} steps: FID {r['fid']:.3f}, confident {r['confident']:.1%}, judge "
              f"{r['judge']:.1%} ({r['judge_vs_real']:.2f} of real), clean {r['clean']:.1%}, rough {r['rough']:.1%} "
              f"({seconds:.0f} s)", flush=True)
    ref = rows[0]["fid"]
    g = f", guidance {guidance:g}" if guidance is not None else ""
    lines = [f"Machine: {cpu_name()}. Run {args.run} ({'x'.join(map(str, run.image_shape))}{g}); {args.n} samples "
             f"each from the same seeds, scored against the 500 held-out test digits.", "",
             f"| sampler | steps | NFE | classifier-FID | / DDPM-250 | KID | confident | {QUALITY_HEAD} | time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.3f} | {r['fid'] / ref:.2f} | "
                     f"{r['kid']:.4f} | {r['confident']:.1%} | {quality_cells(r)} | {r['seconds']:.0f} s |")
    lines.append(f"| real test digits | | | | | | | {quality_cells(real_row)} | |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out) if args.out else run.folder("bench")
    out.mkdir(parents=True, exist_ok=True)
    (out / "fast_samplers.md").write_text(table + "\n")
    (out / "fast_samplers.json").write_text(json.dumps({"run": str(args.run), "n": args.n, "guidance": guidance,
                                                        "real": real_row, "rows": rows}, indent=1))
    print(f"wrote {out / 'fast_samplers.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
