"""Kept for scripts written against the flat layout: the schedules are :mod:`ddpmlab.diffusion.schedules`.

Nothing inside ddpmlab imports this module (tests/test_structure.py checks).
"""

from ddpmlab.diffusion.schedules import SCHEDULES, NoiseSchedule, make_betas, select_timesteps  # noqa: F401
