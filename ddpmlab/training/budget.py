"""A wall-clock budget for a run (``train.minutes``): the steps that fit, from the measured speed.

After :data:`PROBE_END` steps the trainer knows this machine's time per step (measured over
steps PROBE_START..PROBE_END, after the first steps' warm-up) and the time the final samples will take
(their sampler timed over a few steps); :func:`fit_steps` then fixes ``train.steps`` (at most the
configured value) so that the whole run, final samples included, ends within the budget.  The
fitted value is written to RUN/config.yaml, so a resumed run continues the same schedule, and a
faster machine gets more steps of the same recipe.
"""

from __future__ import annotations

import math
import time
from typing import Optional

PROBE_START, PROBE_END = 10, 40  # steps whose duration is measured
SAFETY = 0.97  # keep 3 % of the budget for what the estimate does not see (checkpoints, logging)


def fit_steps(budget_s: float, elapsed_s: float, step_s: float, sampling_s: float, done: int, max_steps: int) -> int:
    """The total steps that fit: ``done`` so far plus what the rest of the budget pays for.

    budget_s: the whole run's budget; elapsed_s: spent so far (set-up included); step_s: seconds
    per training step; sampling_s: the final samples' estimated time.  At least ``done``, at most
    ``max_steps``.
    """
    left = SAFETY * budget_s - elapsed_s - sampling_s
    more = max(0, math.floor(left / step_s)) if step_s > 0 else max_steps
    return int(min(max_steps, max(done, done + more)))


class Budget:
    """The probe of one run: call :meth:`step_done` after every step; it returns the fitted
    ``train.steps`` once (at PROBE_END), else None."""

    def __init__(self, minutes: Optional[float], start_time: float, start_step: int):
        self.minutes, self.start_time = minutes, start_time
        self.active = minutes is not None and start_step < PROBE_START
        self._t_probe: Optional[float] = None

    def step_done(self, done: int, estimate_sampling, max_steps: int) -> Optional[int]:
        """``estimate_sampling()``: seconds the final samples will take (called once, at the fit)."""
        if not self.active:
            return None
        now = time.time()
        if done == PROBE_START:
            self._t_probe = now
        if done < PROBE_END or self._t_probe is None:
            return None
        self.active = False
        step_s = (now - self._t_probe) / (PROBE_END - PROBE_START)
        self.step_s, self.sampling_s = step_s, estimate_sampling()
        return fit_steps(60.0 * self.minutes, now - self.start_time, step_s, self.sampling_s, done, max_steps)
