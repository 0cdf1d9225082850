"""Super-resolution quality (SR3, Saharia et al. 2021, Sec. 4): upscales of held-out low-res images
against the true high-res images, beside bicubic upsampling as the baseline.

* PSNR, 10 log10(MAX^2 / MSE) per image (MAX = 1 on the [0, 1] scale), averaged over images;
* SSIM (Wang et al. 2004, Eq. 13) with their 11x11 Gaussian window of std 1.5, K1 = 0.01, K2 = 0.03,
  on the [0, 1] scale, per image and averaged (both by torchmetrics, in float64: in float32 the
  local variances E[x^2] - mu^2 lose the digits SSIM's constant C2 = 9e-4 is compared with);
* classifier FID (Heusel et al. 2017) of the upscales and of the bicubic images against the true
  images' features: PSNR rewards blur, FID tells whether the upscales look like real digits.

The low-res inputs are made from the held-out images exactly as in training
(:func:`ddpmlab.models.conditioned.low_res`: data.low_res, data.downsample).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from ddpmlab.errors import DDPMError
from ddpmlab.evaluate import metrics as M
from ddpmlab.evaluate.features import batches, build_extractor, extract
from ddpmlab.evaluate.nll import nll_test_data
from ddpmlab.io.images import save_grid
from ddpmlab.models.conditioned import condition_from_low_res, low_res, upsample
from ddpmlab.runs import Run, SamplingPlan, SamplingRequest, draw_samples, grid_scale, plan_request

SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al. 2004, Sec. III-C


def _unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], float64."""
    return ((x.double() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each image: x, target (B, C, H, W) in [-1, 1] -> (B,); inf where they are equal."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(_unit(x), _unit(target), data_range=1.0, dim=(1, 2, 3), reduction="none")


def ssim(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSIM of each image (Wang et al. 2004): x, target (B, C, H, W) in [-1, 1] -> (B,) in [-1, 1]; 1 where equal.

    Images need H, W > 5 (the window's half-width, reflect-padded at the borders)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    if min(x.shape[-2:]) <= SSIM_WINDOW // 2:
        raise DDPMError(f"SSIM needs images larger than {SSIM_WINDOW // 2}x{SSIM_WINDOW // 2}, got "
                        f"{x.shape[-2]}x{x.shape[-1]}")
    return structural_similarity_index_measure(_unit(x), _unit(target), gaussian_kernel=True, sigma=SSIM_SIGMA,
                                               kernel_size=SSIM_WINDOW, data_range=1.0, reduction="none")


def bicubic_upscale(x_low: torch.Tensor, size) -> torch.Tensor:
    """The baseline: low-res images (B, C, h, w) bicubic-upsampled to ``size`` (H, W), clamped to [-1, 1]."""
    return upsample(x_low, size, "bicubic")


def plan_upscale(run: Run, x_low: torch.Tensor, request: SamplingRequest = SamplingRequest()) -> SamplingPlan:
    """The sampler call ``request`` asks for to upscale x_low (B, C, h, w) in [-1, 1] (as the run says where it
    says nothing): the conditioning is x_low brought to the image size by the run's data.upsample, as in training."""
    cond = condition_from_low_res(x_low.float(), run.cfg, run.shape[1:])
    return plan_request(run, dataclasses.replace(request, n=len(x_low), cond=cond), log=lambda m: None)


def upscale(run: Run, x_low: torch.Tensor, sampler: Optional[str] = None, steps: Optional[int] = None, *,
            seed: int = 0, batch_size: int = 256, options: Optional[dict] = None, step_schedule: Optional[str] = None,
            label=None, guidance: Optional[float] = None, progress: bool = True) -> torch.Tensor:
    """The model's upscales of low-res images x_low (B, C, h, w) in [-1, 1]: (B, *run.shape) on the CPU.

    Sample i starts from the noise of seed ``seed`` (batched as every sampler call of ddpmlab.runs)."""
    request = SamplingRequest(sampler, steps, step_schedule, dict(options or {}), label, guidance, seed)
    return draw_samples(run, plan_upscale(run, x_low, request), batch_size=batch_size, progress=progress)


def comparison_grid(x_low: torch.Tensor, upscales: torch.Tensor, truth: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triples (low-res input shown with nearest pixels, upscale[, truth]) in order: (k * B, C, H, W)."""
    inputs = upsample(x_low.float(), upscales.shape[2:], "nearest")
    tiles = [inputs, upscales] + ([truth] if truth is not None else [])
    return torch.stack(tiles, dim=1).reshape(-1, *upscales.shape[1:])


def save_comparison(path, x_low: torch.Tensor, upscales: torch.Tensor, truth: Optional[torch.Tensor] = None,
                    per_row: int = 4) -> Path:
    """A PNG of ``per_row`` triples (input, upscale[, truth]) a row; returns its path."""
    tiles = comparison_grid(x_low, upscales, truth)
    k = len(tiles) // len(upscales)
    return save_grid(tiles, path, nrow=k * min(per_row, len(upscales)), scale=grid_scale(tuple(upscales.shape[1:])))


def spread_images(dataset, n: int) -> torch.Tensor:
    """``n`` images spread evenly over a dataset (images i * N // n; all if it is smaller): (n, C, H, W).
    Bundled digits are sorted by class: the first n would all be zeros."""
    n = min(n, len(dataset))
    index = [i * len(dataset) // n for i in range(n)]
    if getattr(dataset, "x", None) is not None:
        return dataset.x[index].float()
    return torch.stack([dataset[i][0] for i in index]).float()


def _fids(run: Run, truth: torch.Tensor, sets: Dict[str, torch.Tensor], extractor: str,
          inception_weights: Optional[str], batch_size: int, progress: bool, note: list) -> Dict[str, float]:
    """Classifier (or Inception) FID of each set against the true images' features; {} with a note if it cannot."""
    try:
        ex = build_extractor(extractor, tuple(truth.shape[1:]), inception_weights, run.device)
        M.check_fid_samples(len(truth), ex.num_features, "held-out images")
    except DDPMError as e:
        note.append(f"no FID: {e}")
        return {}

    def feats(x):
        return extract(ex, batches(x, batch_size), total=len(x), progress=progress, desc="features")[0]
    real = M.feature_sums(feats(truth))
    return {name: M.fid(real, feats(x)) for name, x in sets.items()}


def evaluate_superres(run: Run, n: Optional[int] = 500, request: SamplingRequest = SamplingRequest(), *,
                      batch_size: int = 256, extractor: str = "classifier", inception_weights: Optional[str] = None,
                      progress: bool = True) -> Tuple[dict, tuple]:
    """PSNR, SSIM and FID of the model's upscales of ``n`` held-out images (sampled as ``request`` asks,
    as the run says where it says nothing) and of bicubic upsampling.

    Returns the results {"metrics": {"model": {...}, "bicubic": {...}}, "data": ..., "settings": ...}
    and examples (low-res, upscales, truth) of the first 16 images.
    """
    cfg = run.cfg
    if cfg.model.condition == "none":
        raise DDPMError(f"{run.dir or 'this run'} is not a super-resolution run (model.condition=none); "
                        "use `ddpm eval RUN` for sample quality")
    truth, what = nll_test_data(cfg, n)
    if len(truth) < 1:
        raise DDPMError("no held-out images to upscale")
    if cfg.data.dataset in ("mnist", "digits") and cfg.data.split != "train":
        what += f" (the run trained on data.split={cfg.data.split}: these images were seen in training)"
    truth = truth.float()
    x_low = low_res(truth, cfg)
    plan = plan_upscale(run, x_low, request)
    up = draw_samples(run, plan, batch_size=batch_size, progress=progress)
    bicubic = bicubic_upscale(x_low, truth.shape[2:])
    notes: list = []
    fids = _fids(run, truth, {"model": up, "bicubic": bicubic}, extractor, inception_weights, batch_size, progress,
                 notes)
    table = {}
    for name, x in (("model", up), ("bicubic", bicubic)):
        table[name] = {"psnr": float(psnr(x, truth).mean()), "ssim": float(ssim(x, truth).mean())}
        if name in fids:
            table[name]["fid"] = fids[name]
    lh, lw = cfg.data.low_res
    data = {"images": what, "n": len(truth), "low_res": [lh, lw], "high_res": list(truth.shape[2:]),
            "downsample": cfg.data.downsample, "upsample": cfg.data.upsample}
    settings = {"sampler": plan.sampler, "steps": plan.steps, "seed": plan.seed,
                "options": {k: v for k, v in request.options.items() if v is not None},
                "step_schedule": plan.step_schedule, "guidance": plan.guidance,
                "extractor": extractor if fids else None}
    results = {"metrics": table, "data": data, "settings": settings, "notes": notes}
    return results, (x_low[:16], up[:16], truth[:16])


def format_superres(results: dict) -> str:
    """The table: metric, model, bicubic."""
    t = results["metrics"]
    fid_name = f"fid ({results['settings']['extractor']})"
    lines = [f"{'metric':<18} {'model':>10} {'bicubic':>10}"]
    for key, label, fmt in (("psnr", "psnr (dB)", ".2f"), ("ssim", "ssim", ".4f"), ("fid", fid_name, ".3f")):
        if key in t["model"]:
            lines.append(f"{label:<18} {t['model'][key]:>10{fmt}} {t['bicubic'][key]:>10{fmt}}")
    return "\n".join(lines + [f"note: {m}" for m in results.get("notes", [])])


def save_superres(results: dict, examples: tuple, path) -> Tuple[Path, Path]:
    """The results as JSON at ``path`` and the examples' triples (input, upscale, truth) as a PNG beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    return path, save_comparison(path.with_suffix(".png"), *examples)
