"""A wall-clock budget for a run (``train.minutes``): the steps that fit, from the measured speed.

After :data:`PROBE_END` steps the trainer knows this machine's time per step (measured over
steps PROBE_START..PROBE_END, after the first steps' warm-up) and the time a drawing of the samples takes
(their sampler timed over a few steps; the final one and those every train.sample_every steps);
:func:`fit_steps` then fixes ``train.steps`` (at most the
configured value) so that the whole run, final samples included, ends within the budget.  The
fitted value is written to RUN/config.yaml, so a resumed run continues the same schedule, and a
faster machine gets more steps of the same recipe.
"""

from __future__ import annotations

import time
from typing import Optional

PROBE_START, PROBE_END = 10, 40  # steps whose duration is measured
SAFETY = 0.97  # keep 3 % of the budget for what the estimate does not see (checkpoints, logging)


def fit_steps(budget_s: float, elapsed_s: float, step_s: float, sampling_s: float, done: int, max_steps: int,
              sample_every: int = 0) -> int:
    """The total steps that fit: ``done`` so far plus what the rest of the budget pays for.

    budget_s: the whole run's budget; elapsed_s: spent so far (set-up included); step_s: seconds
    per training step; sampling_s: one drawing of the samples (the final one, and one at every
    ``sample_every`` steps before the end).  At least ``done``, at most ``max_steps``.
    """
    left = SAFETY * budget_s - elapsed_s

    def cost(total: int) -> float:
        between = (total - 1) // sample_every - done // sample_every if sample_every else 0
        return (total - done) * step_s + sampling_s * (1 + max(between, 0))

    lo, hi = done, max_steps  # cost grows with total: the largest total whose cost fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost(mid) <= left:
            lo = mid
        else:
            hi = mid - 1
    return int(lo)


class Budget:
    """The budget of one run: call :meth:`step_done` after every step; at each fit it returns the
    ``train.steps`` that fit, else None.

    The first fit comes at PROBE_END; after it the fit is redone every ``refit_every`` steps from the
    mean time per step since PROBE_START (drawings of the samples taken out), so a machine that slows
    down or speeds up mid-run still ends within the budget.  A resumed run (started past PROBE_START)
    keeps the steps it stored.
    """

    def __init__(self, minutes: Optional[float], start_time: float, start_step: int, sample_every: int = 0,
                 refit_every: int = 25):
        self.minutes, self.start_time, self.sample_every = minutes, start_time, sample_every
        self.refit_every = refit_every
        self.active = minutes is not None and start_step < PROBE_START
        self._t_probe: Optional[float] = None
        self._overhead = 0.0  # seconds since PROBE_START not spent in training steps (the sampling estimate)
        self.sampling_s: Optional[float] = None
        self.step_s: Optional[float] = None

    def _drawings_between(self, done: int) -> int:
        """Sample drawings (train.sample_every) after PROBE_START and before step ``done``'s own."""
        if not self.sample_every:
            return 0
        return (done - 1) // self.sample_every - PROBE_START // self.sample_every

    def step_done(self, done: int, estimate_sampling, max_steps: int) -> Optional[int]:
        """After step ``done``; ``max_steps``: the configured train.steps, the most a fit gives.
        ``estimate_sampling()``: seconds a drawing of the samples takes (called once, at PROBE_END)."""
        if not self.active:
            return None
        now = time.time()
        if done == PROBE_START:
            self._t_probe = now
        if self._t_probe is None or done < PROBE_END or (done > PROBE_END and (done - PROBE_END) % self.refit_every):
            return None
        if self.sampling_s is None:
            t0 = time.time()
            self.sampling_s = estimate_sampling()
            self._overhead += time.time() - t0
        spent = now - self._t_probe - self._overhead - self.sampling_s * self._drawings_between(done)
        self.step_s = max(spent, 0.0) / (done - PROBE_START)
        fitted = fit_steps(60.0 * self.minutes, time.time() - self.start_time, self.step_s, self.sampling_s, done,
                           max_steps, self.sample_every)
        return fitted
