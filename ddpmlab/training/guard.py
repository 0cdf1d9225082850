"""Non-finite training steps never reach the weights.

* :class:`BadStepGuard` - a step whose loss or gradient norm is NaN/inf never reaches
  the weights (no optimizer step, no EMA update); it is counted, and after
  ``train.max_bad_steps`` such steps in a row the run stops with a clear message.
* :func:`optimizer_step` - applies a checked step, and lets an fp16 loss scaler see every
  step so that it can lower its scale after an overflow.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import list_checkpoints


class BadStepGuard:
    """Counts steps with a non-finite loss or gradient norm; stops the run after too many in a row.

    ``ok = guard.check(step, loss, grad_norm)`` returns whether the step may update the
    weights; ``guard.total`` (all bad steps), ``guard.in_a_row`` and ``guard.since_log``
    (reset by :meth:`take_since_log`) feed the log.
    """

    def __init__(self, max_bad_steps: int, say: Callable[[str], None] = print, run_dir=None):
        self.max_bad_steps = max_bad_steps
        self.say = say
        self.run_dir = run_dir
        self.total = self.in_a_row = self.since_log = 0

    def check(self, step: int, loss: torch.Tensor, grad_norm: Optional[torch.Tensor], accelerator=None) -> bool:
        """True when ``loss`` and ``grad_norm`` are finite (on every process); counts and reports bad steps."""
        loss_ok = bool(torch.isfinite(loss.detach().float()).all())
        norm_ok = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm).float()).all())
        if accelerator is not None and accelerator.num_processes > 1:  # every rank must take the same decision
            bad = torch.tensor(float(not (loss_ok and norm_ok)), device=accelerator.device)
            norm_ok = norm_ok and accelerator.reduce(bad, "max").item() == 0.0
        if loss_ok and norm_ok:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        self.since_log += 1
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        what = f"loss={float(loss.detach().float().mean()):.4g}, grad_norm={norm:.4g}"
        scaler = getattr(accelerator, "scaler", None) is not None
        kind = "fp16 gradient overflow (the scaler lowers its scale)" if scaler and loss_ok else \
            "non-finite loss or gradient"
        self.say(f"step {step + 1}: {kind} ({what}): step skipped, weights and EMA unchanged "
                 f"({self.in_a_row} in a row; the run stops at train.max_bad_steps={self.max_bad_steps})")
        if self.in_a_row >= self.max_bad_steps:
            ckpts = list_checkpoints(self.run_dir) if self.run_dir is not None else []
            last = f"the last checkpoint {ckpts[0].name} is intact" if ckpts else "no checkpoint was written yet"
            raise DDPMError(
                f"stopped at step {step + 1}: {self.in_a_row} steps in a row had a non-finite loss or gradient "
                f"({what}); none reached the weights and {last}. Lower train.lr, set train.grad_clip or check "
                f"the data, then continue with `ddpm train --resume {self.run_dir} --force train.lr=...`"
            )
        return False

    def take_since_log(self) -> int:
        n, self.since_log = self.since_log, 0
        return n


def optimizer_step(accelerator, opt, ok: bool) -> bool:
    """Apply the optimizer step of a checked step; return whether the weights changed.

    Without a gradient scaler a bad step (``ok`` False) is simply not applied.  With one
    (fp16 on GPU) ``opt.step()`` is always called: the scaler sees the inf/NaN gradients,
    skips the update itself and lowers its scale, which is what lets fp16 recover from an
    overflow; calling it also closes the scaler's unscale/update cycle of this step.
    """
    if getattr(accelerator, "scaler", None) is not None:
        opt.step()
        return ok and not accelerator.optimizer_step_was_skipped
    if ok:
        opt.step()
    return ok
