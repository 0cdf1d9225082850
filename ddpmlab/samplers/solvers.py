"""High-order solvers of the probability-flow ODE: DPM-Solver++ (2M, 3M), UniPC, EDM Euler/Heun.

Every solver has the registry signature ``sample(predict, schedule, x_T, steps, *, generator,
callback, timesteps=..., **options)``; ``predict(x_t, t) -> (eps, x0)`` is a
:class:`~ddpmlab.samplers.base.ModelPredictor`, ``x_T`` standard normal (variance-preserving),
``steps`` the number of model evaluations (NFE) and ``timesteps`` a step schedule name of
:data:`~ddpmlab.samplers.steps.STEP_SCHEDULES` or an explicit decreasing list of training times.

Inside, each solver works in the variance-exploding view of Karras et al. 2022: with
sigma_t = sqrt((1 - abar_t) / abar_t), x = x_t / sqrt(abar_t) = x_0 + sigma_t eps solves
dx/dsigma = (x - D(x; sigma)) / sigma, where D is the denoiser's x0 prediction.  In
lambda = -log sigma (the half log-SNR) this is the linear ODE dx/dlambda = D - x, whose exact
solution over a step of length h is x_t = e^{-h} x_s + int_0^h e^{-(h-u)} D(lambda_s + u) du
(the variation-of-constants formula of DPM-Solver++, Lu et al. 2022, in data-prediction form):
the multistep solvers approximate D by a polynomial through past evaluations and integrate it.  The last step goes to sigma = 0,
where the solution is the last x0 prediction (first order).
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Tuple

import torch

from ddpmlab.diffusion.schedules import NoiseSchedule, t_of_sigma
from ddpmlab.errors import ConfigError
from ddpmlab.samplers.base import Callback, randn_like
from ddpmlab.samplers.steps import Timesteps, check_steps, resolve_timesteps, sigmas_for

Denoiser = Callable[[torch.Tensor, float, torch.Tensor], torch.Tensor]


def ve_denoiser(predict) -> Denoiser:
    """D(x, sigma, t): the x0 prediction for the VE-scaled x = x_t / sqrt(abar) at noise level sigma (time t)."""

    def denoise(x: torch.Tensor, sigma: float, t: torch.Tensor) -> torch.Tensor:
        # x_t = sqrt(abar) x with abar = 1 / (1 + sigma^2)
        _, x0 = predict(x / math.sqrt(1.0 + sigma**2), t)
        return x0

    return denoise


def euler_heun_step(denoise: Denoiser, x: torch.Tensor, sigma, sigma_next, t,
                    t_next=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One step of the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma from noise level
    sigma to sigma_next: Euler (Karras et al. 2022, Alg. 1, lines 4-5), or Heun when ``t_next``
    (the timestep of sigma_next) is given: the trapezoidal correction of lines 6-8, one more
    evaluation.  The step to sigma = 0 is always Euler (D has no value there): pass t_next None.

    ``denoise(x, sigma, t)``: D at noise level sigma, timestep t.  sigma may be a float or a
    tensor broadcasting against x.  Returns (x at sigma_next, the x0 prediction at sigma).
    """
    x0 = denoise(x, sigma, t)
    d = (x - x0) / sigma  # Alg. 1, line 4: dx/dsigma
    x_next = x + (sigma_next - sigma) * d
    if t_next is not None:  # Alg. 1, lines 6-8: trapezoidal correction
        d2 = (x_next - denoise(x_next, sigma_next, t_next)) / sigma_next
        x_next = x + (sigma_next - sigma) * (d + d2) / 2
    return x_next, x0


def _start(predict, schedule: NoiseSchedule, x_T: torch.Tensor, n: int, timesteps: Timesteps):
    """Training times (n,), noise levels (n+1,) ending in 0, the VE-scaled start x and the denoiser."""
    ts = resolve_timesteps(timesteps, schedule, n)
    sigmas = sigmas_for(schedule, ts)
    return ts, sigmas.tolist(), x_T * math.sqrt(1.0 + float(sigmas[0]) ** 2), ve_denoiser(predict)


def _report(callback: Callback, k: int, x: torch.Tensor, sigma: float, x0: torch.Tensor) -> None:
    if callback is not None:  # callbacks see the variance-preserving x_t, as for ddpm/ddim
        callback(k, x / math.sqrt(1.0 + sigma**2), x0)


def _order_at(i: int, n: int, order: int, lower_order_final: bool) -> int:
    """Warm-up (i+1 evaluations available) and, near the end, lower orders (n - i steps left)."""
    return min(order, i + 1, n - i) if lower_order_final else min(order, i + 1)


# --- DPM-Solver++ (Lu et al. 2022, "DPM-Solver++", data prediction, multistep) ------------------

def _dpmpp_update(x: torch.Tensor, h: float, m: List[torch.Tensor], hs: List[float]) -> torch.Tensor:
    """One multistep update over log-SNR step h from x at lambda_s, with x0 predictions m[0] (newest,
    at lambda_s), m[1], m[2] and the previous step lengths hs[0] = lambda_s - lambda_1, hs[1]."""
    e = math.exp(-h)
    if len(m) == 1:  # first order, D = m0: DPM-Solver++(1), which is DDIM
        return e * x + (1 - e) * m[0]
    if len(m) == 2:  # DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: D = (1 + 1/2r) m0 - 1/2r m1
        r = hs[0] / h
        return e * x + (1 - e) * ((1 + 1 / (2 * r)) * m[0] - 1 / (2 * r) * m[1])
    # third order: the parabola through the three x0 predictions, D(lambda_s + u) = m0 + d1 (u/h) + d2 (u/h)^2
    # with d1 ~ h D' and d2 ~ h^2 D''/2 from divided differences, integrated exactly against e^{-(h-u)}
    r0, r1 = hs[0] / h, hs[1] / h
    d1_0, d1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
    d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    c1 = (h - 1 + e) / h  # int_0^h e^{-(h-u)} (u/h) du
    c2 = (h * h - 2 * h + 2 - 2 * e) / (h * h)  # int_0^h e^{-(h-u)} (u/h)^2 du
    return e * x + (1 - e) * m[0] + c1 * d1 + c2 * d2


def _dpmpp(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int, order: int, *,
           callback: Callback, timesteps: Timesteps, lower_order_final: bool) -> torch.Tensor:
    ts, sig, x, denoise = _start(predict, schedule, x_T, steps, timesteps)
    lam = [-math.log(sigma) for sigma in sig[:-1]]
    m: List[torch.Tensor] = []  # x0 predictions, newest first
    for i in range(steps):
        x0 = denoise(x, sig[i], ts[i])
        m = [x0] + m[:order - 1]
        if sig[i + 1] == 0:
            x = x0  # the final step to sigma = 0 is first order: x = D
        else:
            q = _order_at(i, steps, order, lower_order_final)
            h = -math.log(sig[i + 1]) - lam[i]
            hs = [lam[i - k] - lam[i - k - 1] for k in range(q - 1)]
            x = _dpmpp_update(x, h, m[:q], hs)
        _report(callback, i, x, sig[i + 1], x0)
    return x


@torch.no_grad()
def dpmpp_2m(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, *,
             generator: Optional[torch.Generator] = None, callback: Callback = None,
             timesteps: Timesteps = "logsnr", lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): second order, one model evaluation per step (NFE = steps).

    The first step is first order (warm-up), the last (to sigma = 0) too.  x_T: (B, ...) -> x_0.
    """
    return _dpmpp(predict, schedule, x_T, steps, 2, callback=callback, timesteps=timesteps,
                  lower_order_final=lower_order_final)


@torch.no_grad()
def dpmpp_3m(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, *,
             generator: Optional[torch.Generator] = None, callback: Callback = None,
             timesteps: Timesteps = "logsnr", lower_order_final: bool = True) -> torch.Tensor:
    """DPM-Solver++(3M): third-order multistep, NFE = steps; orders 1, 2, 3, ..., 3, 2, 1.

    The x0 polynomial is integrated exactly (coefficient c2 above).  The widely copied 3M code
    (DPM-Solver's reference code, diffusers, k-diffusion) weights the second difference by half
    of that, phi_2/h - 1/2 instead of 2 (phi_2/h - 1/2), which keeps it second order only.
    """
    return _dpmpp(predict, schedule, x_T, steps, 3, callback=callback, timesteps=timesteps,
                  lower_order_final=lower_order_final)


# --- UniPC (Zhao et al. 2023), B(h) = e^h - 1 ("bh2"), data prediction -----------------------

def _phi(k: int, z: float) -> float:
    """phi_k(z) = (phi_{k-1}(z) - 1/(k-1)!) / z with phi_0 = e^z: int_0^1 e^{(1-v) z} v^{k-1}/(k-1)! dv."""
    if abs(z) < 1e-4:  # series: sum_j z^j / (j + k)!
        return sum(z**j / math.factorial(j + k) for j in range(6))
    p = math.exp(z)
    for j in range(1, k + 1):
        p = (p - 1 / math.factorial(j - 1)) / z
    return p


def _unipc_weights(h: float, rs: List[float]) -> torch.Tensor:
    """Solve UniPC's order conditions (Zhao et al. 2023, data-prediction form) for the weights a_k:
    sum_k a_k r_k^(n-1) = -n! h phi_{n+1}(-h) / B(h), n = 1..len(rs), with B(h) = e^{-h} - 1 (bh2).

    From: D_k / r_k = sum_n r_k^(n-1) h^n D^(n) / n! must reproduce the Taylor terms
    h^(n+1) phi_{n+1}(-h) D^(n) of the exact integral.  (diffusers uses the h -> 0 limit 1/2
    where a single weight is needed; we solve the conditions as they are.)"""
    b_h = math.expm1(-h)
    p = len(rs)
    R = torch.tensor([[r ** (n - 1) for r in rs] for n in range(1, p + 1)], dtype=torch.float64)
    g = torch.tensor([-math.factorial(n) * h * _phi(n + 1, -h) / b_h for n in range(1, p + 1)],
                     dtype=torch.float64)
    return torch.linalg.solve(R, g)


def _unipc_combine(x: torch.Tensor, h: float, m0: torch.Tensor, diffs: List[torch.Tensor],
                   rs: List[float]) -> torch.Tensor:
    # x_t = e^{-h} x_s + (1 - e^{-h}) m0 - B(h) sum_k a_k D_k / r_k, D_k = m_k - m0
    out = math.exp(-h) * x - math.expm1(-h) * m0
    if diffs:
        a = _unipc_weights(h, rs).tolist()
        out = out - math.expm1(-h) * sum(ak * d / r for ak, d, r in zip(a, diffs, rs))
    return out


@torch.no_grad()
def unipc(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, *,
          generator: Optional[torch.Generator] = None, callback: Callback = None,
          timesteps: Timesteps = "logsnr", order: int = 2, lower_order_final: bool = True) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, B(h) = e^h - 1 "bh2"): predictor UniP-p, then corrector UniC-p, NFE = steps.

    UniP-p uses the p newest x0 predictions (order p); UniC-p adds the evaluation at the
    predicted point, which the next predictor reuses, so the corrector costs no extra NFE and
    raises the order to p + 1 (default p = 2: third order).  No corrector after the last step.
    """
    if not isinstance(order, int) or order < 1:
        raise ConfigError(f"unipc order must be a positive integer, got {order!r}")
    ts, sig, x, denoise = _start(predict, schedule, x_T, steps, timesteps)
    lam = [-math.log(sigma) for sigma in sig[:-1]]
    hist: List[Tuple[float, torch.Tensor]] = []  # (lambda, x0) newest first
    x_prev, q_prev = None, 0
    for i in range(steps):
        x0 = denoise(x, sig[i], ts[i])
        if x_prev is not None:  # UniC: correct x_i with the evaluation just made at the predicted x_i
            h = lam[i] - hist[0][0]
            rs = [(lk - hist[0][0]) / h for lk, _ in hist[1:q_prev]] + [1.0]
            diffs = [mk - hist[0][1] for _, mk in hist[1:q_prev]] + [x0 - hist[0][1]]
            x = _unipc_combine(x_prev, h, hist[0][1], diffs, rs)
        hist = [(lam[i], x0)] + hist[:order - 1]
        if sig[i + 1] == 0:
            x = x0
        else:  # UniP: predict x_{i+1}
            q = _order_at(i, steps, order, lower_order_final)
            h = -math.log(sig[i + 1]) - lam[i]
            rs = [(lk - lam[i]) / h for lk, _ in hist[1:q]]
            diffs = [mk - x0 for _, mk in hist[1:q]]
            x_prev, q_prev = x, q
            x = _unipc_combine(x, h, x0, diffs, rs)
        _report(callback, i, x, sig[i + 1], x0)
    return x


# --- EDM Euler / Heun with optional churn (Karras et al. 2022, Alg. 1 and 2) -------------------

def churn_gamma(sigma: float, n: int, s_churn: float, s_tmin: float, s_tmax: float, sigma_max: float) -> float:
    """gamma_i of Karras et al. 2022, Alg. 2, kept so that (1 + gamma) sigma stays within the model's range."""
    if s_churn <= 0 or not s_tmin <= sigma <= s_tmax:
        return 0.0
    return max(0.0, min(s_churn / n, math.sqrt(2) - 1, sigma_max / sigma - 1))


def churn(x: torch.Tensor, sigma: float, gamma: float, s_noise: float,
          generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, float]:
    # Karras et al. 2022, Alg. 2, lines 5-6: sigma_hat = (1 + gamma) sigma, x_hat = x + sqrt(sigma_hat^2 - sigma^2) eps
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1 + gamma)
    return x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * randn_like(x, generator), sigma_hat


def _check_churn(s_churn: float, s_noise: float) -> None:
    if s_churn < 0:
        raise ConfigError(f"s_churn must be >= 0, got {s_churn}")
    if s_noise < 0:
        raise ConfigError(f"s_noise must be >= 0, got {s_noise}")


def _edm(predict, schedule: NoiseSchedule, x_T: torch.Tensor, levels: int, heun: bool, *,
         generator, callback: Callback, timesteps: Timesteps, s_churn: float, s_tmin: float,
         s_tmax: float, s_noise: float) -> torch.Tensor:
    _check_churn(s_churn, s_noise)
    ts, sig, x, denoise = _start(predict, schedule, x_T, levels, timesteps)
    sigma_max = float(sigmas_for(schedule, torch.tensor([schedule.num_timesteps - 1.0]))[0])
    for i in range(levels):
        gamma = churn_gamma(sig[i], levels, s_churn, s_tmin, s_tmax, sigma_max)
        x, s_hat = churn(x, sig[i], gamma, s_noise, generator)
        t_hat = ts[i] if gamma == 0 else t_of_sigma(schedule, torch.tensor(s_hat))
        t_next = ts[i + 1] if heun and sig[i + 1] > 0 else None
        x, x0 = euler_heun_step(denoise, x, s_hat, sig[i + 1], t_hat, t_next)
        _report(callback, i, x, sig[i + 1], x0)
    return x


@torch.no_grad()
def euler(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 20, *,
          generator: Optional[torch.Generator] = None, callback: Callback = None,
          timesteps: Timesteps = "karras", s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Euler steps in sigma (Karras et al. 2022, Alg. 2 without the correction), NFE = steps.

    Without churn this is DDIM (eta = 0) on any step schedule; s_churn > 0 adds fresh noise
    at levels in [s_tmin, s_tmax] (a stochastic sampler).
    """
    return _edm(predict, schedule, x_T, steps, False, generator=generator, callback=callback,
                timesteps=timesteps, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


@torch.no_grad()
def heun(predict, schedule: NoiseSchedule, x_T: torch.Tensor, steps: int = 19, *,
         generator: Optional[torch.Generator] = None, callback: Callback = None,
         timesteps: Timesteps = "karras", s_churn: float = 0.0, s_tmin: float = 0.0,
         s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1; Alg. 2 with churn).

    N noise levels cost 2N - 1 evaluations (the step to sigma = 0 is an Euler step), so
    ``steps`` NFE buy N = (steps + 1) // 2 levels: an even ``steps`` uses one evaluation less.
    """
    check_steps(steps, schedule)
    return _edm(predict, schedule, x_T, heun.levels(steps), True, generator=generator, callback=callback,
                timesteps=timesteps, s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)


heun.levels = lambda steps, **options: (steps + 1) // 2  # noise levels for `steps` NFE (steps.levels_for)
