"""Samplers by name.  ``SAMPLERS["ddim"](predict, schedule, x_T, steps, **options)``.

:mod:`.registry` holds one :class:`~ddpmlab.samplers.registry.SamplerSpec` per sampler (its
function, the options it takes, its step-schedule kind, default steps): the one list the
command line, the run layer, the benchmarks and the tests use.
"""

from ddpmlab.samplers.ancestral import ddim, ddpm
from ddpmlab.samplers.base import ModelPredictor, randn_like
from ddpmlab.samplers.langevin import pc
from ddpmlab.samplers.registry import SAMPLERS, get_sampler
from ddpmlab.samplers.solvers import dpmpp_2m, dpmpp_3m, euler, heun, unipc
from ddpmlab.samplers.steps import STEP_SCHEDULES

__all__ = ["SAMPLERS", "get_sampler", "ModelPredictor", "randn_like", "ddpm", "ddim", "STEP_SCHEDULES",
           "dpmpp_2m", "dpmpp_3m", "unipc", "euler", "heun", "pc"]
