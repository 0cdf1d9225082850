"""Negative log-likelihood of a trained run in bits/dim: the full variational bound.

``nll_bits_per_dim`` evaluates every term of Ho et al. 2020, Eq. 5 for each test
example (one draw of x_t per timestep, as Nichol & Dhariwal 2021 do), and returns the
total with its breakdown (prior L_T, decoder L_0, sum of the KL terms) and the mean
term at every t.  ``evaluate_nll`` does it for a run directory and writes
``RUN/eval/nll.json`` and ``RUN/eval/nll_vs_t.png``; ``ddpm eval RUN --metrics nll``
calls it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ddpmlab.data import build_dataset, load_digits, load_mnist, make_toy
from ddpmlab.diffusion.likelihood import LN2, check_decoder_data, prior_kl, vlb_term
from ddpmlab.diffusion.process import eps_x0_from_output, network_inputs, q_sample
from ddpmlab.diffusion.reverse import p_mean_log_variance, split_output
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.progress import progress_bar
from ddpmlab.runs import load_run

# reverse(x_t, i) -> (mean, log_var) of p(x_{t-1} | x_t); i: (B,) entries of the schedule
Reverse = Callable[[torch.Tensor, torch.Tensor], tuple]


@dataclass
class NLLResult:
    """Bits per dimension of a test set under the bound; per_t[i] is the mean term at entry i."""

    bits_per_dim: float
    prior: float
    decoder: float
    kl_sum: float
    per_t: list = field(default_factory=list)
    stderr: float = 0.0  # standard error of the mean over examples
    n: int = 0
    num_timesteps: int = 0
    decoder_kind: str = "discretized"
    bin_width: Optional[float] = None
    t_stride: int = 1


def model_reverse(model: Callable, schedule: NoiseSchedule, prediction: str, variance: str,
                  y: Optional[torch.Tensor] = None, clip_x0: Optional[float] = None) -> Reverse:
    """p_theta(x_{t-1} | x_t) of a network: its (mean, log_var) at entry i of the full schedule."""

    def reverse(x_t: torch.Tensor, i: torch.Tensor):
        # a flow's network takes its own inputs (x_flow, t * T); every other network (x_t, t)
        out = model(*network_inputs(schedule, x_t, schedule.timesteps[i.cpu()].to(x_t.device), prediction), y)
        pred, v_raw = split_output(out.to(x_t.dtype), x_t)
        _, x0 = eps_x0_from_output(schedule, x_t, i, pred, prediction)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        return p_mean_log_variance(schedule, x_t, i, x0, variance, v_raw)

    return reverse


def _entries(T: int, stride: int, generator: torch.Generator) -> torch.Tensor:
    """Entry 0 (the decoder) and one random entry per block of ``stride`` KL terms (stratified)."""
    if stride == 1:
        return torch.arange(T)
    starts = torch.arange(1, T, stride)
    width = torch.clamp(T - starts, max=stride)
    pick = starts + (torch.rand(len(starts), generator=generator, dtype=torch.float64) * width).long()
    return torch.cat([torch.zeros(1, dtype=torch.long), pick])


@torch.no_grad()
def bound_terms(reverse: Reverse, schedule: NoiseSchedule, x0: torch.Tensor, *, decoder: str = "discretized",
                bin_width: float = 2.0 / 255.0, bounded: bool = True, t_stride: int = 1,
                generator: Optional[torch.Generator] = None):
    """Every term of the bound for a batch: (terms (B, T) nats/dim, prior (B,) nats/dim).

    Terms at entries not evaluated (``t_stride`` > 1) hold the stratified estimate (the
    drawn entry's value times its block's size, put at the drawn entry; the rest zero),
    so ``terms.sum(1)`` estimates the sum of all terms without bias.
    """
    T = schedule.num_timesteps
    gen = generator or torch.Generator().manual_seed(0)
    b = x0.shape[0]
    terms = torch.zeros(b, T, dtype=torch.float64)
    entries = _entries(T, t_stride, gen)
    weights = torch.ones(len(entries), dtype=torch.float64)
    if t_stride > 1:
        starts = torch.arange(1, T, t_stride)
        weights[1:] = torch.clamp(T - starts, max=t_stride).double()
    for i, w in zip(entries.tolist(), weights.tolist()):
        idx = torch.full((b,), i, dtype=torch.long, device=x0.device)
        noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype).to(x0.device)
        x_t = q_sample(schedule, x0, idx, noise)
        mean, log_var = reverse(x_t, idx)
        terms[:, i] = w * vlb_term(schedule, x0, x_t, idx, mean, log_var, decoder, bin_width, bounded).double().cpu()
    return terms, prior_kl(schedule, x0).double().cpu()


def nll_bits_per_dim(model: Callable, schedule: NoiseSchedule, x: torch.Tensor, *, prediction: str = "eps",
                     variance: str = "fixed_large", decoder: str = "discretized",
                     bin_width: Optional[float] = None, clip_x0: Optional[float] = None, t_stride: int = 1,
                     batch_size: int = 250, seed: int = 0, device=None, progress: bool = True,
                     labels: Optional[torch.Tensor] = None) -> NLLResult:
    """Upper bound on the NLL of test data ``x`` (N, ...) in bits/dim, with its breakdown.

    ``decoder``: ``discretized`` (Eq. 13; 8-bit data are recognised, other data need
    ``bin_width``) or ``continuous`` (Gaussian density: a differential NLL, may be < 0).
    """
    bin_width, bounded = check_decoder_data(x, decoder, bin_width, source="the test data")
    if t_stride < 1 or t_stride >= schedule.num_timesteps and schedule.num_timesteps > 1:
        raise DDPMError(f"t stride must be between 1 and {schedule.num_timesteps - 1}, got {t_stride}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    s = schedule.to(device)
    gen = torch.Generator().manual_seed(seed)
    all_terms, all_prior = [], []
    n_batches = (len(x) + batch_size - 1) // batch_size
    bar = progress_bar(progress, total=n_batches, desc="NLL (variational bound)", leave=False)
    try:
        for k in range(n_batches):
            xb = x[k * batch_size:(k + 1) * batch_size].to(device, dtype)
            yb = None if labels is None else labels[k * batch_size:(k + 1) * batch_size].to(device)
            reverse = model_reverse(model, s, prediction, variance, yb, clip_x0)
            terms, prior = bound_terms(reverse, s, xb, decoder=decoder, bin_width=bin_width, bounded=bounded,
                                       t_stride=t_stride, generator=gen)
            all_terms.append(terms)
            all_prior.append(prior)
            bar.update(1)
    finally:
        bar.close()
    return summarize(torch.cat(all_terms), torch.cat(all_prior), decoder=decoder,
                     bin_width=bin_width if decoder == "discretized" else None, t_stride=t_stride)


def summarize(terms: torch.Tensor, prior: torch.Tensor, decoder: str = "discretized",
              bin_width: Optional[float] = None, t_stride: int = 1) -> NLLResult:
    """terms (N, T), prior (N,) in nats/dim -> an :class:`NLLResult` in bits/dim."""
    total = terms.sum(1) + prior
    n = len(total)
    stderr = float(total.std() / n**0.5) / LN2 if n > 1 else 0.0
    return NLLResult(
        bits_per_dim=float(total.mean()) / LN2, prior=float(prior.mean()) / LN2,
        decoder=float(terms[:, 0].mean()) / LN2, kl_sum=float(terms[:, 1:].sum(1).mean()) / LN2,
        per_t=[float(v) / LN2 for v in terms.mean(0)], stderr=stderr, n=n, num_timesteps=terms.shape[1],
        decoder_kind=decoder, bin_width=bin_width, t_stride=t_stride)


def save_nll_report(result: NLLResult, out_dir, extra: Optional[dict] = None) -> tuple[Path, Path]:
    """Write ``nll.json`` (numbers and settings) and ``nll_vs_t.png`` (the terms against t)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "nll.json"
    js.write_text(json.dumps({**asdict(result), **(extra or {})}, indent=1))
    per_t = torch.tensor(result.per_t)
    t = torch.arange(1, len(per_t) + 1)
    k = result.t_stride
    if k > 1:  # each block of k KL terms holds one (weighted) draw: show the block's mean term
        starts = torch.arange(1, len(per_t), k)
        tt = torch.cat([t[:1], (t[starts] + (k - 1) / 2).clamp(max=len(per_t))])
        vals = torch.cat([per_t[:1], torch.stack([per_t[a:a + k].sum() / min(k, len(per_t) - a) for a in starts])])
    else:
        tt, vals = t, per_t
    from matplotlib.figure import Figure  # matplotlib only when a plot is drawn

    fig = Figure(figsize=(10, 4), dpi=100)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(tt.numpy(), vals.abs().numpy(), lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("t")
    ax1.set_ylabel("|L_{t-1}| (bits/dim)" + (f", mean of blocks of {k}" if k > 1 else ""))
    ax1.set_title("terms of the bound (t = 1: decoder L_0)")
    ax2.plot(t.numpy(), (per_t.cumsum(0) + result.prior).numpy(), lw=1.5)
    ax2.axhline(result.bits_per_dim, color="0.5", ls="--", lw=1)
    ax2.set_xlabel("t")
    ax2.set_ylabel("L_T + sum_{s<=t} L_{s-1} (bits/dim)")
    ax2.set_title(f"bound: {result.bits_per_dim:.3f} bits/dim")
    fig.tight_layout()
    png = out_dir / "nll_vs_t.png"
    fig.savefig(png)
    return js, png


def nll_test_data(cfg, n: Optional[int] = None) -> tuple[torch.Tensor, str]:
    """Held-out data for a run's NLL: (x (N, ...), description).

    MNIST / digits: their fixed test split; 2D toy sets: a fresh draw (seed train.seed + 1);
    image folders have no split: their images (say so in the report).
    """
    d = cfg.data
    if d.dataset == "mnist":
        x, what = load_mnist("test")[0], "MNIST test split"
    elif d.dataset == "digits":
        x, what = load_digits("test")[0], "8x8 digits test split"
    elif d.dataset == "toy":
        count = n or 5000
        x, what = make_toy(d.toy, count, d.toy_noise, seed=cfg.train.seed + 1), f"fresh {d.toy} samples"
    else:
        ds = build_dataset(cfg)
        count = min(len(ds), n or len(ds))
        x, what = torch.stack([ds[i][0] for i in range(count)]), f"{d.path} (training images: no test split)"
    return (x[:n] if n else x), what


def evaluate_nll(run_dir, *, n: Optional[int] = None, decoder: str = "discretized", bin_width: Optional[float] = None,
                 t_stride: int = 1, batch_size: int = 250, seed: int = 0, weights: str = "ema", device="auto",
                 progress: bool = True) -> tuple[NLLResult, Path, Path]:
    """The bound of a run's newest checkpoint on held-out data, written to RUN/eval/nll.{json,png}."""
    run = load_run(run_dir, weights, device)
    cfg = run.cfg
    x, what = nll_test_data(cfg, n)
    result = nll_bits_per_dim(run.model, run.schedule, x, prediction=cfg.diffusion.prediction,
                              variance=cfg.diffusion.variance, decoder=decoder, bin_width=bin_width,
                              clip_x0=run.clip_x0, t_stride=t_stride, batch_size=batch_size,
                              seed=seed, device=run.device, progress=progress)
    extra = {"run_dir": str(run.dir), "data": what, "weights": weights, "checkpoint": run.checkpoint,
             "variance": cfg.diffusion.variance, "loss_type": cfg.diffusion.loss_type, "seed": seed}
    js, png = save_nll_report(result, run.folder("eval"), extra)
    return result, js, png


def format_nll(result: NLLResult) -> str:
    """One short paragraph for the terminal."""
    unit = "bits/dim" if result.decoder_kind == "discretized" else "bits/dim (differential: continuous decoder)"
    est = "" if result.t_stride == 1 else f", KL terms estimated from every {result.t_stride}th t (stratified)"
    return (f"NLL <= {result.bits_per_dim:.4f} +- {result.stderr:.4f} {unit} on {result.n} examples{est}\n"
            f"  prior L_T {result.prior:.2e}, decoder L_0 {result.decoder:.4f}, sum of KL terms {result.kl_sum:.4f}")
