"""Training objectives (Ho et al. 2020, Algorithm 1) for eps / x0 / v parameterisations, and flow matching's.

Besides L_simple: min-SNR-gamma weighting (Hang et al. 2023), the variational bound
L_vlb and the hybrid loss L_simple + lambda L_vlb for models with a learned variance
(Nichol & Dhariwal 2021, Sec. 3.1), and importance sampling of t (their Sec. 3.3).
:class:`DiffusionObjective` bundles them as the trainer's one loss function; :class:`FlowObjective`
is the velocity loss of a flow run (Lipman et al. 2023; Liu et al. 2023).  :func:`objective_from_config`
picks the one a config asks for.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ddpmlab.diffusion.flow import FLOW_T_SAMPLING, flow_sample, network_time, sample_flow_times, velocity_target
from ddpmlab.diffusion.likelihood import LN2, data_decoder, vlb_term
from ddpmlab.diffusion.process import edm_coefficients, eps_x0_from_output, q_sample, training_target
from ddpmlab.diffusion.reverse import p_mean_log_variance, split_output
from ddpmlab.diffusion.schedules import NoiseSchedule

LOSSES = ("l2", "l1")
LOSS_TYPES = ("simple", "hybrid", "vlb")
DDPM_T_SAMPLING = ("uniform", "importance", "lognormal")
T_SAMPLING = DDPM_T_SAMPLING + tuple(k for k in FLOW_T_SAMPLING if k not in DDPM_T_SAMPLING)


def sample_timesteps(batch: int, T: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    # Algorithm 1, line 3: t ~ Uniform({1, ..., T}); indices 0..T-1 here
    return torch.randint(0, T, (batch,), device=device, generator=generator)


def per_example_loss(output: torch.Tensor, target: torch.Tensor, loss: str = "l2") -> torch.Tensor:
    """Mean over all but the batch dimension of the squared (l2) or absolute (l1) error: (B,)."""
    diff = output - target
    if loss == "l2":
        err = diff.pow(2)
    elif loss == "l1":
        err = diff.abs()
    else:
        raise ValueError(f"unknown loss '{loss}'; choose one of {', '.join(LOSSES)}")
    return err.flatten(1).mean(1)


def diffusion_loss(model: Callable, schedule: NoiseSchedule, x0: torch.Tensor, *,
                   t: torch.Tensor, noise: torch.Tensor, y: Optional[torch.Tensor] = None,
                   prediction: str = "eps", loss: str = "l2") -> torch.Tensor:
    """The simple loss L_simple of Ho et al. 2020, Eq. 14, for one batch: a scalar.

    x0: (B, ...) data; t: (B,) timesteps; noise: like x0. With prediction='eps' this is
    ||eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t)||^2 (Algorithm 1, line 5).
    """
    x_t = q_sample(schedule, x0, t, noise)
    out = model(x_t, t, y)
    target = training_target(schedule, x0, t, noise, prediction)
    return per_example_loss(out.float(), target.float(), loss).mean()


def min_snr_weight(schedule: NoiseSchedule, t: torch.Tensor, gamma: float, prediction: str = "eps") -> torch.Tensor:
    """Per-example weight (B,) of min-SNR-gamma (Hang et al. 2023, Eq. 10), float32.

    The loss in x0 terms is weighted by min(SNR_t, gamma); an eps target already carries
    SNR_t (||eps - eps_hat||^2 = SNR_t ||x0 - x0_hat||^2) and a v target SNR_t + 1, so
    those are divided out.
    """
    snr = torch.exp(schedule.log_snr.to(t.device)[t])
    w = torch.clamp(snr, max=gamma)
    if prediction == "eps":
        w = w / snr
    elif prediction == "v":
        w = w / (snr + 1.0)
    elif prediction != "x0":
        raise ValueError(f"unknown prediction type '{prediction}'")
    return w.float()


def edm_weight(schedule: NoiseSchedule, t: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight lambda(sigma) = 1 / c_out^2 (Karras et al. 2022, Table 1) per example (B,), float32.

    On the x0 error of the preconditioned denoiser it makes the loss ||F - F_target||^2 of the
    network inside; on the eps error it is the factor (sigma^2 + sd^2) / sd^2, since
    ||x0_hat - x0||^2 = sigma^2 ||eps_hat - eps||^2 with sigma^2 = (1 - abar) / abar.
    """
    c_out = edm_coefficients(schedule, t, torch.zeros(t.shape[0], dtype=torch.float64), sigma_data)[2]
    return c_out.reshape(-1).pow(-2).float()


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (autocast may hand over bf16/fp16; float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


class UniformTimesteps:
    """t ~ Uniform({0, ..., T-1}) (Algorithm 1, line 3); every weight is 1."""

    kind = "uniform"

    def __init__(self, T: int):
        self.T = T

    def sample(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return sample_timesteps(batch, self.T, device=device, generator=generator)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones(t.shape, device=t.device)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


class LogNormalTimesteps(UniformTimesteps):
    """t whose noise level sigma_t = sqrt((1 - abar_t) / abar_t) is nearest to a draw of
    ln sigma ~ N(mean, std^2): EDM's training distribution (Karras et al. 2022, Sec. 5) on the
    discrete schedule (noise levels beyond the schedule's ends go to its first or last t)."""

    def __init__(self, schedule: NoiseSchedule, mean: float = -1.2, std: float = 1.2):
        super().__init__(schedule.num_timesteps)
        abar = schedule.alphas_cumprod.double()
        self.log_sigma = 0.5 * (torch.log1p(-abar) - torch.log(abar))  # increasing in t
        self.mean, self.std = mean, std

    def sample(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = torch.randn(batch, generator=generator, device=generator.device if generator is not None else None,
                        dtype=torch.float64)
        target = (self.mean + self.std * z).cpu()
        ls = self.log_sigma
        hi = torch.searchsorted(ls, target).clamp(1, len(ls) - 1)
        nearer_lo = (target - ls[hi - 1]).abs() <= (ls[hi] - target).abs()
        return torch.where(nearer_lo, hi - 1, hi).to(device)


class ImportanceTimesteps(UniformTimesteps):
    """Importance sampling of t for L_vlb (Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18).

    p_t is proportional to sqrt(E[L_t^2]) over the last ``history`` values of each term;
    t is uniform until every term has that many.  A share ``uniform_prob`` of uniform
    keeps every p_t > 0.  The weights 1 / (T p_t) make E_{t~p}[w_t L_t] = mean_t L_t.
    The history is part of the checkpoint (``state_dict``), so a resumed run draws the
    same t as one that never stopped.
    """

    kind = "importance"

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 1e-3):
        super().__init__(T)
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(T, history, dtype=torch.float64)
        self.count = torch.zeros(T, dtype=torch.long)

    def warm(self) -> bool:
        return bool((self.count >= self.history.shape[1]).all())

    def probs(self) -> torch.Tensor:
        """p_t (T,) float64."""
        if not self.warm():
            return torch.full((self.T,), 1.0 / self.T, dtype=torch.float64)
        p = self.history.pow(2).mean(1).sqrt()  # Eq. 18: p_t ~ sqrt(E[L_t^2])
        p = p / p.sum()
        return (1 - self.uniform_prob) * p + self.uniform_prob / self.T

    def sample(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        if not self.warm():
            return super().sample(batch, device, generator)
        dev = generator.device if generator is not None else device
        p = self.probs().to(dev)
        return torch.multinomial(p, batch, replacement=True, generator=generator).to(device)

    def weights(self, t: torch.Tensor) -> torch.Tensor:
        return (1.0 / (self.T * self.probs()[t.cpu()])).float().to(t.device)

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Push the (all-process) losses (B,) of the terms t (B,) into the history."""
        h = self.history.shape[1]
        for ti, li in zip(t.cpu().tolist(), losses.double().cpu().tolist()):
            if not math.isfinite(li):  # a skipped (NaN/inf) step must not poison p_t
                continue
            if self.count[ti] < h:
                self.history[ti, self.count[ti]] = li
                self.count[ti] += 1
            else:
                self.history[ti] = torch.cat([self.history[ti, 1:], torch.tensor([li], dtype=torch.float64)])

    def state_dict(self) -> dict:
        return {"kind": self.kind, "history": self.history.tolist(), "count": self.count.tolist()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:
            return
        self.history = torch.tensor(state["history"], dtype=torch.float64)
        self.count = torch.tensor(state["count"], dtype=torch.long)


class DiffusionObjective:
    """The training loss of a run: ``loss = objective(model, x0, t=t, noise=noise, y=y)``.

    loss_type ``simple``: L_simple (Ho et al. 2020, Eq. 14), optionally min-SNR-gamma
    weighted; ``hybrid``: L_simple + lambda L_vlb with the mean's gradient stopped in
    L_vlb, so the VLB trains only the variance (Nichol & Dhariwal 2021, Eq. 16);
    ``vlb``: L_vlb alone.  A one-sample estimate of L_vlb - L_T is T * L_t at the drawn t
    (the prior L_T has no parameters); like improved-diffusion, L_t is in bits/dim, so
    lambda = 0.001 at T = 1000 adds L_t itself.
    With importance sampling of t, every call of one optimizer step (each micro-batch)
    weights its terms by the p_t the step's t were drawn from; :meth:`end_step`, once per
    optimizer step, then pushes the step's t and L_t into the history.  ``gather`` (e.g.
    ``accelerator.gather``) collects them from all processes in global-batch order, so
    every process keeps the same history.
    """

    def __init__(self, schedule: NoiseSchedule, *, prediction: str = "eps", loss: str = "l2",
                 loss_type: str = "simple", variance: str = "fixed_large", vlb_weight: float = 0.001,
                 min_snr_gamma: Optional[float] = None, t_sampling: str = "uniform",
                 decoder: str = "discretized", bin_width: Optional[float] = 2.0 / 255.0,
                 gather: Optional[Callable] = None, sigma_data: float = 0.5,
                 lognormal: tuple = (-1.2, 1.2)):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"unknown loss_type '{loss_type}'; choose one of {', '.join(LOSS_TYPES)}")
        self.schedule, self.prediction, self.loss, self.loss_type = schedule, prediction, loss, loss_type
        self.variance, self.vlb_weight, self.min_snr_gamma = variance, vlb_weight, min_snr_gamma
        self.decoder, self.bin_width = decoder, bin_width
        self.gather = gather or (lambda x: x)
        T = schedule.num_timesteps
        self.sigma_data = sigma_data
        if t_sampling == "importance":
            self.t_sampler = ImportanceTimesteps(T)
        elif t_sampling == "lognormal":
            self.t_sampler = LogNormalTimesteps(schedule, *lognormal)
        else:
            self.t_sampler = UniformTimesteps(T)
        self._step_terms: list = []  # (t, L_t) of this optimizer step's micro-batches, for end_step

    @classmethod
    def from_config(cls, cfg, schedule: NoiseSchedule, gather: Optional[Callable] = None) -> "DiffusionObjective":
        d = cfg.diffusion
        decoder, bin_width = data_decoder(cfg)
        return cls(schedule, prediction=d.prediction, loss=d.loss, loss_type=d.loss_type, variance=d.variance,
                   vlb_weight=d.vlb_weight, min_snr_gamma=d.min_snr_gamma, t_sampling=d.t_sampling,
                   decoder=decoder, bin_width=bin_width, gather=gather, sigma_data=d.sigma_data,
                   lognormal=(d.lognormal_mean, d.lognormal_std))

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """t (B,) for the next batch, drawn from ``generator``."""
        return self.t_sampler.sample(batch, device, generator)

    def vlb_terms(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, pred: torch.Tensor,
                  v_raw: Optional[torch.Tensor]) -> torch.Tensor:
        """L_t of each example in bits/dim (B,), from the network's prediction and variance output."""
        s = self.schedule
        _, x0_hat = eps_x0_from_output(s, x_t, t, _f32(pred), self.prediction)
        mean, log_var = p_mean_log_variance(s, x_t, t, x0_hat, self.variance, None if v_raw is None else _f32(v_raw))
        bounded = self.decoder == "discretized"
        return vlb_term(s, x0, x_t, t, mean, log_var, self.decoder, self.bin_width or 0.0, bounded) / LN2

    def __call__(self, model: Callable, x0: torch.Tensor, *, t: torch.Tensor, noise: torch.Tensor,
                 y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The batch loss (a scalar). x0: (B, ...); t: (B,) timesteps; noise: like x0."""
        s = self.schedule
        x_t = q_sample(s, x0, t, noise)
        pred, v_raw = split_output(model(x_t, t, y), x_t)
        T = s.num_timesteps
        if self.loss_type in ("simple", "hybrid"):
            target = training_target(s, x0, t, noise, self.prediction)
            losses = per_example_loss(pred.float(), target.float(), self.loss)  # Eq. 14
            if self.min_snr_gamma is not None:
                losses = losses * min_snr_weight(s, t, self.min_snr_gamma, self.prediction)
            elif self.prediction == "edm":
                losses = losses * edm_weight(s, t, self.sigma_data).to(losses.device)
        if self.loss_type == "hybrid":
            # Nichol & Dhariwal 2021, Eq. 16: stop-gradient on the mean, L_vlb trains Sigma_theta only
            vb = self.vlb_terms(_f32(x0), _f32(x_t), t, pred.detach(), v_raw)
            losses = losses + self.vlb_weight * T * vb
        elif self.loss_type == "vlb":
            vb = self.vlb_terms(_f32(x0), _f32(x_t), t, pred, v_raw)
            weights = self.t_sampler.weights(t)  # 1 / (T p_t): the p_t this step's t were drawn from
            if isinstance(self.t_sampler, ImportanceTimesteps):
                self._step_terms.append((t.detach(), vb.detach()))
            losses = T * vb * weights  # Nichol & Dhariwal 2021, Eq. 18: E_{t~p}[w_t L_t] = mean_t L_t
        return losses.mean()

    def end_step(self) -> None:
        """Push the t and L_t of this optimizer step (all micro-batches, all processes) into the history.

        Call it once per optimizer step, after its last micro-batch, on every process (it gathers).
        """
        if not self._step_terms:
            return
        t = torch.cat([t for t, _ in self._step_terms])
        vb = torch.cat([vb for _, vb in self._step_terms])
        self._step_terms = []
        self.t_sampler.update(self.gather(t.contiguous()), self.gather(vb.contiguous()))

    def state_dict(self) -> dict:
        """What resume needs (the importance-sampling history), JSON-serialisable."""
        return self.t_sampler.state_dict()

    def load_state_dict(self, state: Optional[dict]) -> None:
        self.t_sampler.load_state_dict(state)


class FlowObjective:
    """The loss of a flow run: ``loss = objective(model, x0, t=t, noise=noise, y=y)``, t in [0, 1].

    x_t = (1 - t) x_0 + t eps, and the network, called as ``model(x_t, t * T, y)``, learns the velocity:
    loss = ||v_theta(x_t, t) - (eps - x_0)||^2 (Lipman et al. 2023, Eq. 23; Liu et al. 2023, Eq. 1;
    ``l1``: the absolute error).  t is drawn uniform, logit-normal or by the mode density
    (:func:`~ddpmlab.diffusion.flow.sample_flow_times`; Esser et al. 2024, Eq. 19-20).  It keeps no state;
    it has the methods of :class:`DiffusionObjective` the training task calls.
    """

    def __init__(self, T: int, *, loss: str = "l2", t_sampling: str = "uniform", logit_normal: tuple = (0.0, 1.0),
                 mode_scale: float = 1.29):
        if t_sampling not in FLOW_T_SAMPLING:
            raise ValueError(f"unknown flow t_sampling '{t_sampling}'; choose one of {', '.join(FLOW_T_SAMPLING)}")
        self.T, self.loss, self.t_sampling = T, loss, t_sampling
        self.logit_normal, self.mode_scale = logit_normal, mode_scale

    @classmethod
    def from_config(cls, cfg, schedule: NoiseSchedule) -> "FlowObjective":
        d = cfg.diffusion
        return cls(schedule.num_timesteps, loss=d.loss, t_sampling=d.t_sampling,
                   logit_normal=(d.logit_normal_mean, d.logit_normal_std), mode_scale=d.mode_scale)

    def sample_timesteps(self, batch: int, device=None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Flow times t (B,) float32 in [0, 1] for the next batch, drawn from ``generator``."""
        mean, std = self.logit_normal
        return sample_flow_times(self.t_sampling, batch, generator=generator, device=device, mean=mean, std=std,
                                 mode_scale=self.mode_scale)

    def __call__(self, model: Callable, x0: torch.Tensor, *, t: torch.Tensor, noise: torch.Tensor,
                 y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The batch loss (a scalar). x0: (B, ...); t: (B,) flow times; noise: like x0."""
        x_t = flow_sample(x0, t, noise)
        out = model(x_t, network_time(t, self.T), y)
        return per_example_loss(out.float(), velocity_target(x0, noise).float(), self.loss).mean()

    def end_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Optional[dict]) -> None:
        pass


def objective_from_config(cfg, schedule: NoiseSchedule, gather: Optional[Callable] = None):
    """The training loss of ``cfg``: a :class:`FlowObjective` for diffusion.process flow, else a
    :class:`DiffusionObjective` (``gather``: its importance sampling's all-process gather)."""
    if cfg.diffusion.process == "flow":
        return FlowObjective.from_config(cfg, schedule)
    return DiffusionObjective.from_config(cfg, schedule, gather)
