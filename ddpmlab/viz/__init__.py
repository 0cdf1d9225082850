"""Pictures of diffusion: sample grids, forward strips, reverse trajectories (GIF), schedule
plots, loss curves and 2D toy figures.  ``ddpm viz --help`` lists the commands.

* :mod:`.images` - scatter plots, GIF writing (Pillow), matplotlib figures without pyplot;
* :mod:`.samples` - samples of a run as a grid or scatter plot (what ``ddpm sample`` writes);
* :mod:`.commands` - what each ``ddpm viz`` command draws;
* :mod:`.diffusion` - forward-process strips, reverse trajectories of x_t and predicted x0;
* :mod:`.plots` - schedules side by side, loss and evaluation curves of runs;
* :mod:`.toy` - 2D data, forward diffusion and reverse process, stills and animation.

Grids of images are written by :mod:`ddpmlab.io.images` (re-exported here).
"""

from ddpmlab.io.images import grid_image, make_grid, save_grid
from ddpmlab.viz.diffusion import (
    forward_steps,
    record_trajectory,
    save_forward_strip,
    save_reverse_gif,
    save_reverse_strip,
)
from ddpmlab.viz.images import figure_array, save_figure, save_gif, save_scatter
from ddpmlab.viz.plots import plot_loss, plot_schedules
from ddpmlab.viz.toy import save_toy_animation, save_toy_data, save_toy_forward, save_toy_reverse, toy_trajectory

__all__ = [
    "make_grid", "grid_image", "save_grid", "save_scatter", "save_gif", "save_figure", "figure_array",
    "forward_steps", "save_forward_strip", "record_trajectory", "save_reverse_gif", "save_reverse_strip",
    "plot_schedules", "plot_loss", "save_toy_data", "save_toy_forward", "save_toy_reverse",
    "save_toy_animation", "toy_trajectory",
]
