"""Every kind of figure is drawn on its own canvas: the caller's matplotlib backend and pyplot
figure list are left alone, and the pictures keep their sizes."""

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.viz import diffusion, images, plots, toy, toy_figures

S = NoiseSchedule.make("linear", 100)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


PTS = _randn(200, 2)
IMGS = _randn(6, 2, 1, 8, 8, seed=1).clamp(-1, 1)  # (frames, n, C, H, W) in [-1, 1]


@pytest.fixture
def foreign_backend():
    """pyplot on a backend other than Agg, as in a notebook or a GUI session; restored afterwards."""
    plt = pytest.importorskip("matplotlib.pyplot")
    old = matplotlib.get_backend()
    matplotlib.use("template")
    yield plt
    matplotlib.use(old)


def _runs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.csv").write_text("step,loss\n" + "".join(f"{10 * i},{1 / (i + 1)}\n" for i in range(20)))
    (run / "eval.csv").write_text("step,fid\n100,30\n200,20\n")
    return [run]


# name -> (writer(tmp_path) -> path, (width, height) in pixels, exact?)
# exact: a fixed canvas (figsize * dpi); otherwise bbox_inches="tight" crops to the content:
# the sizes the pyplot-drawn figures had (matplotlib 3.11, its bundled DejaVu fonts), within 3 %
FIGURES = {
    "scatter": (lambda d: images.save_scatter(PTS, d / "f.png", reference=PTS / 2), (320, 449), False),
    "schedules": (lambda d: plots.plot_schedules(d / "f.png", T=100), (1287, 357), False),
    "loss": (lambda d: plots.plot_loss(_runs(d), d / "f.png"), (1090, 370), False),
    "forward_strip": (lambda d: diffusion.save_forward_strip(IMGS[0], S, d / "f.png", ts=(0, 10, 50, 99)),
                      (361, 236), False),
    "reverse_strip": (lambda d: diffusion.save_reverse_strip(IMGS, IMGS / 2, [0, 1, 2, 3, 4, 5], d / "f.png",
                                                             total_steps=5, stills=4, rows=1), (380, 221), False),
    "toy_data": (lambda d: toy.save_toy_data(PTS, d / "f.png"), (167, 184), False),
    "toy_forward": (lambda d: toy.save_toy_forward(PTS, S, d / "f.png", ts=(0, 50, 99)), (461, 179), False),
    "toy_reverse": (lambda d: toy.save_toy_reverse(_randn(4, 200, 2, seed=2), [0, 1, 2, 3], 3,
                                                   d / "f.png", stills=4, reference=PTS), (609, 178), False),
    "toy_animation": (lambda d: toy.save_toy_animation(PTS, S, _randn(2, 200, 2, seed=3), [0, 1], 1,
                                                       d / "f.gif", forward_frames=3), (210, 210), True),
    "panels": (lambda d: toy_figures.save_panels([("q(x_t)", toy_figures.forward_points(S, PTS, [-1, 10, 99])),
                                                  ("other", [("x", PTS)])], d / "f.png", reference=PTS),
               (660, 480), True),
}


@pytest.mark.parametrize("name", FIGURES)
def test_a_figure_leaves_backend_and_pyplot_alone_and_keeps_its_size(name, tmp_path, foreign_backend):
    write, (w, h), exact = FIGURES[name]
    path = write(tmp_path)
    assert matplotlib.get_backend() == "template"  # no switch to Agg behind the caller's back
    assert foreign_backend.get_fignums() == []
    size = Image.open(path).size
    if exact:
        assert size == (w, h)
    else:
        assert size == (pytest.approx(w, rel=0.03), pytest.approx(h, rel=0.03))


def test_new_figure_is_not_a_pyplot_figure_and_gives_its_pixels(foreign_backend):
    fig, axes = images.new_figure((3, 2), dpi=50, ncols=2, squeeze=False)
    axes[0, 1].plot([0, 1], [1, 0])
    pixels = images.figure_array(fig)
    assert pixels.shape == (100, 150, 3) and pixels.dtype == np.uint8
    assert pixels.min() < 255  # something was drawn
    assert axes.shape == (1, 2) and foreign_backend.get_fignums() == []


def test_a_far_outlier_does_not_shrink_the_scatter_plot(tmp_path):
    """The frame follows the reference data: one sample at (6, 35) next to a unit-size data set
    used to squash the plot into a thin strip; now it is counted in the legend instead."""
    ref = torch.randn(500, 2, generator=torch.Generator().manual_seed(0))
    with_outlier = torch.cat([ref[:200], torch.tensor([[6.0, 35.0]])])
    sizes = [Image.open(images.save_scatter(x, tmp_path / f"{i}.png", reference=ref)).size
             for i, x in enumerate([ref[:200], with_outlier])]
    assert abs(sizes[0][0] - sizes[1][0]) <= 0.1 * sizes[0][0] and abs(sizes[0][1] - sizes[1][1]) <= 0.1 * sizes[0][1]


def test_the_toy_animation_draws_at_most_one_forward_frame_per_timestep_however_many_are_asked(tmp_path):
    """forward_frames=10**7 (a number typed into the demo's page) costs what T frames do: no array of
    10**7 timesteps (80 MB) is ever built."""
    import tracemalloc

    short = NoiseSchedule.make("linear", 12)
    tracemalloc.start()
    try:
        gif = toy.save_toy_animation(PTS, short, _randn(2, 200, 2, seed=3), [0, 1], 1, tmp_path / "f.gif",
                                     forward_frames=10**7)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    with Image.open(gif) as img:
        assert img.n_frames == 12 + 2  # every timestep of the forward process once, then the two reverse frames
