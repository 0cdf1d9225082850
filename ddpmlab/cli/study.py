"""``ddpm eval``, ``ddpm bench`` and ``ddpm viz``: read the options, ask the library, say what was written.

Samples are drawn as the run says unless an option says otherwise (:mod:`ddpmlab.runs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import torch

from ddpmlab.cli.options import listed_classes, prompts_asked, sampling_request
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate import METRICS, EvalSettings, bench, evaluate_run, format_results
from ddpmlab.evaluate.nll import evaluate_nll, format_nll
from ddpmlab.evaluate.superres import evaluate_superres, format_superres, save_superres
from ddpmlab.io.checkpoint import load_run_config, require_run_dir
from ddpmlab.runs import load_run, plan_request, resolve_device
from ddpmlab.viz import commands as viz

EVAL_METRICS = ("nll",)  # metrics with their own code path; the others come from ddpmlab.evaluate.METRICS


def cmd_eval(args) -> int:
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in EVAL_METRICS and m not in METRICS]
    if unknown:
        raise DDPMError(f"unknown metric(s) {', '.join(unknown)} in --metrics; choose from "
                        f"{', '.join(EVAL_METRICS + tuple(METRICS))}")
    device = resolve_device(args.device)
    if load_run_config(require_run_dir(args.run_dir)).model.condition == "low_res":
        return _eval_superres(args, metrics, device)  # super-resolution: PSNR, SSIM, FID of upscales
    if "nll" in metrics:
        result, js, png = evaluate_nll(args.run_dir, n=args.n, decoder=args.decoder, bin_width=args.bin_width,
                                       t_stride=args.t_stride, batch_size=args.batch_size, seed=args.seed,
                                       weights=args.weights, device=device, progress=not args.no_progress)
        print(format_nll(result))
        print(f"wrote {js} and {png}")
    quality = [m for m in metrics if m not in EVAL_METRICS]
    if quality or not metrics:  # no --metrics: the sample-quality defaults of the data kind
        _eval_sample_quality(args, quality, device)
    return 0


def _eval_superres(args, metrics: List[str], device: torch.device) -> int:
    """A super-resolution run: its upscales of held-out low-res images against the truth, beside bicubic."""
    if metrics:
        raise DDPMError(f"--metrics {args.metrics}: a super-resolution run is scored by PSNR, SSIM and FID of its "
                        "upscales (all of them, always); drop --metrics")
    request = sampling_request(args, n=1)
    request.check()
    run = load_run(args.run_dir, args.weights, device)
    extractor = args.extractor or ("inception" if args.inception_weights else "classifier")
    results, examples = evaluate_superres(run, args.n or 500, request, batch_size=args.batch_size,
                                          extractor=extractor, inception_weights=args.inception_weights,
                                          progress=not args.no_progress)
    st, d = results["settings"], results["data"]
    tag = f"{run.checkpoint}_{args.weights}_{st['sampler']}{st['steps']}_n{d['n']}_seed{st['seed']}"
    js, png = save_superres(results, examples, args.out or run.folder("eval") / f"superres_{tag}.json")
    print(f"{args.run_dir} ({run.checkpoint}, {args.weights}): {d['n']} upscales {d['low_res'][1]}x"
          f"{d['low_res'][0]} -> {d['high_res'][1]}x{d['high_res'][0]} of {d['images']}, {st['sampler']} "
          f"{st['steps']} steps, seed {st['seed']}")
    print(format_superres(results))
    print(f"wrote {js} and {png}")
    return 0


def _eval_sample_quality(args, metrics: List[str], device: torch.device) -> None:
    """FID/KID/IS/precision-recall (images) or SWD/MMD (2-D) of samples, beside n data points."""
    extractor = args.extractor or ("inception" if args.inception_weights else "classifier")
    s = EvalSettings(metrics=metrics, n=args.n or 1000, sampler=args.sampler, steps=args.steps,
                     sampler_options={"eta": args.eta, "variance": args.variance, "threshold": args.threshold},
                     step_schedule=args.step_schedule, guidance=args.guidance, label=args.label,
                     prompts=prompts_asked(args), seed=args.seed,
                     batch_size=args.batch_size, extractor=extractor, inception_weights=args.inception_weights,
                     weights=args.weights, baseline=not args.no_baseline)
    results, path = evaluate_run(args.run_dir, s, device, cache_dir=args.cache_dir, use_cache=not args.no_cache,
                                 progress=not args.no_progress, out=args.out)
    st, run = results["settings"], results["run"]
    what = f", {results['extractor']['name']} features" if "extractor" in results else ""
    guidance = f", guidance {st['guidance']:g}" if st.get("guidance") is not None else ""
    print(f"{args.run_dir} ({run['checkpoint']}, {run['weights']}): {st['n']} samples, {st['sampler']} "
          f"{st['steps']} steps{guidance}, seed {st['seed']}{what}")
    print(format_results(results))
    print(f"wrote {path}")


def cmd_bench(args) -> int:
    entries = [bench.BenchEntry.parse(s) for s in args.samplers.split(",") if s.strip()]
    nfes = bench.parse_nfes(args.nfe)
    if (args.run_dir is None) == (args.analytic is None):
        raise DDPMError("give either RUN_DIR (a trained run) or --analytic mixture2d|mixture64d")
    if args.n is not None and args.n < 2:
        raise DDPMError(f"--n must be at least 2, got {args.n}")
    if args.analytic:
        res = bench.bench_analytic(args.analytic, entries, nfes, n=args.n or 20000, seed=args.seed)
        out = Path(args.out or f"runs/bench-{args.analytic}")
    else:
        res = bench.bench_run(args.run_dir, entries, nfes, n=args.n or 256, seed=args.seed,
                              reference_steps=args.reference_steps, batch_size=args.batch_size,
                              device=resolve_device(args.device), weights=args.weights)
        out = Path(args.out or Path(args.run_dir) / "bench")
    print(bench.markdown_table(res))
    for path in bench.save(res, out):
        print(f"wrote {path}")
    if args.run_dir:
        path = bench.save_recommendation(res, args.run_dir)
        best = ", ".join(f"{k}: {v['sampler']}" + (f":{v['timesteps']}" if v["timesteps"] else "")
                         for k, v in bench.recommendation(res)["by_nfe"].items())
        print(f"wrote {path} (best per NFE: {best}); ddpm sample {args.run_dir} without --sampler uses it")
    return 0


def cmd_viz(args) -> int:
    kind = args.viz_command
    if kind == "forward":
        ts = [int(t) for t in args.t.split(",")] if args.t else None
        files = viz.viz_forward(args.run_dir, args.config, args.n, ts, args.seed, args.out)
    elif kind == "schedules":
        names = [s.strip() for s in args.schedules.split(",") if s.strip()]
        files = viz.viz_schedules(names, args.T, args.beta_start, args.beta_end, args.out)
    elif kind == "loss":
        files = viz.viz_loss(args.run_dirs, args.smooth, args.out)
    elif kind == "grid" and args.npz:
        files = viz.grid_from_npz(args.npz, args.out)
    elif kind == "toy" and not args.run_dir:
        files = viz.viz_toy(None, None, args.config, args.n, args.seed, args.frames, args.out)
    else:
        files = _viz_sampling(args, kind)
    for f in files:
        print(f"wrote {f}")
    return 0


def _viz_sampling(args, kind: str) -> List[Path]:
    """viz reverse / toy / grid of a run: the run, its sampler call (as the run says unless told), the pictures."""
    if not args.run_dir:
        raise DDPMError(f"ddpm viz {kind} needs RUN_DIR" + (" (to sample) or --npz FILE" if kind == "grid" else ""))
    request = sampling_request(args)
    request.check()
    run = load_run(args.run_dir, args.weights, resolve_device(args.device))
    if listed_classes(args, run):
        return []
    plan = plan_request(run, request)
    if kind == "reverse":
        return viz.viz_reverse(run, plan, args.n, args.seed, args.frames, args.out)
    if kind == "toy":
        return viz.viz_toy(run, plan, None, args.n, args.seed, args.frames, args.out)
    # plan.n: --n, or a text run's --n per prompt
    return viz.viz_grid(run, plan, plan.n, args.seed, args.out, args.batch_size, not args.no_progress)
