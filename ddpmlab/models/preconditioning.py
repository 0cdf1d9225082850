"""EDM's preconditioning around a denoiser network (Karras et al. 2022, Sec. 5 and Table 1).

:class:`EDMPreconditioned` wraps a network F with the input, skip and output scalings
c_in, c_skip, c_out so that its output is the denoised image D(x_t) = c_skip' x_t +
c_out F(c_in' x_t, t), which the rest of ddpmlab reads as an x0 prediction
(``diffusion.prediction: edm``).  The network then sees inputs and learns targets of unit
variance at every noise level; with the weighting lambda = 1 / c_out^2 of
:class:`~ddpmlab.diffusion.objectives.DiffusionObjective` the loss is ||F - F_target||^2.
The noise level reaches the network as the timestep t (the discrete VP schedule's index),
as everywhere else in ddpmlab, instead of EDM's c_noise = ln(sigma) / 4.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ddpmlab.diffusion.process import edm_coefficients
from ddpmlab.diffusion.schedules import NoiseSchedule


class EDMPreconditioned(nn.Module):
    """D(x_t, t, y) = c_skip' x_t + c_out net(c_in' x_t, t, y): the denoised x0 (see the module doc).

    ``net`` may return twice the data channels (a learned-variance head): the second half
    passes through unscaled.  Its parameters are those of ``net`` (state-dict keys ``net.*``).
    """

    def __init__(self, net: nn.Module, schedule: NoiseSchedule, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.schedule = schedule
        self.sigma_data = float(sigma_data)
        self.num_classes = getattr(net, "num_classes", None)  # read by classifier-free guidance

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """x: (B, C, ...) the VP x_t; ``kwargs`` (e.g. an SR3 conditioning ``cond=``) go to ``net`` unscaled."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        xw = x.to(torch.promote_types(x.dtype, torch.float32))  # the scalings in float32 at least
        c_in, c_skip, c_out = edm_coefficients(self.schedule, t, xw, self.sigma_data)
        out = self.net((c_in * xw).to(x.dtype), t, y, **kwargs)
        channels = x.shape[1]
        d = c_skip * xw + c_out * out[:, :channels].to(xw.dtype)
        if out.shape[1] == channels:
            return d.to(out.dtype)
        return torch.cat([d.to(out.dtype), out[:, channels:]], dim=1)
