"""A ControlNet's control images: the detectors against analytic truth (the edges of a square are its border, a
blur of a constant is that constant, a mask is the pixels above its threshold), scribbles lie on the thickened
edges, and a paired folder gives each image the picture of the same name below control/ (or refuses the run)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.config import load_config
from ddpmlab.data import build_dataset
from ddpmlab.data.control import (
    PairedControls,
    as_channels,
    control_folder,
    detector,
    edges,
    gaussian_blur,
    mask,
    read_control,
    scribble,
)
from ddpmlab.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def _square(h=12, w=14, top=3, left=2, size=6, low=-1.0, high=1.0):
    """A bright square on a dark background, in [-1, 1], and its mask."""
    inside = torch.zeros(h, w, dtype=torch.bool)
    inside[top:top + size, left:left + size] = True
    return torch.where(inside, high, low)[None, None], inside


def _border(inside: torch.Tensor) -> torch.Tensor:
    """The pixels of a region with a 4-neighbour outside it in the image (the image's frame is no edge)."""
    padded = torch.nn.functional.pad(inside[None].float(), (1, 1, 1, 1), mode="replicate")[0].bool()
    interior = padded[2:, 1:-1] & padded[:-2, 1:-1] & padded[1:-1, 2:] & padded[1:-1, :-2]
    return inside & ~interior


@pytest.mark.parametrize("top,left,size", [(3, 2, 6), (0, 0, 5), (4, 7, 4)])
def test_the_edges_of_a_square_are_its_border(top, left, size):
    x, inside = _square(top=top, left=left, size=size)
    assert torch.equal(edges(x, 0.2)[0, 0].bool(), _border(inside))
    dim, _ = _square(top=top, left=left, size=size, low=-0.2, high=0.2)  # a step of 0.2 in [0, 1]: magnitude 0.1
    assert not edges(dim, 0.2).any() and torch.equal(edges(dim, 0.05)[0, 0].bool(), _border(inside))


def test_edges_of_a_colour_image_are_those_of_its_luminance_and_a_constant_has_none():
    x, inside = _square()
    rgb = torch.cat([x, -torch.ones_like(x), -torch.ones_like(x)], dim=1)  # red square: luminance step 0.299
    assert torch.equal(edges(rgb, 0.1)[0, 0].bool(), _border(inside)) and not edges(rgb, 0.16).any()
    assert not edges(torch.full((2, 3, 9, 9), 0.3), 0.0).any()


@pytest.mark.parametrize("sigma", [0.5, 2.0, 5.0])
def test_a_blur_of_a_constant_is_that_constant(sigma):
    x = torch.full((2, 3, 11, 9), 0.37)
    torch.testing.assert_close(gaussian_blur(x, sigma), x, atol=1e-6, rtol=0)


def test_a_blur_keeps_the_mean_of_a_periodic_pattern_and_the_sum_of_a_centred_spot():
    spot = torch.zeros(1, 1, 21, 21)
    spot[0, 0, 10, 10] = 1.0
    b = gaussian_blur(spot, 1.5)
    assert abs(b.sum().item() - 1.0) < 1e-6 and torch.equal(b, b.flip(-1)) and torch.equal(b, b.transpose(-1, -2))
    r = torch.arange(-3, 4, dtype=torch.float32)
    g = torch.exp(-0.5 * (r / 1.5) ** 2)
    g = g / torch.exp(-0.5 * (torch.arange(-5, 6, dtype=torch.float32) / 1.5) ** 2).sum()
    torch.testing.assert_close(b[0, 0, 10, 7:14], g * g[3], atol=1e-6, rtol=1e-5)  # separable: the row at the centre


def test_a_mask_is_the_pixels_above_its_threshold():
    values = torch.linspace(-1, 1, 21).view(1, 1, 3, 7)
    for threshold in (0.0, 0.25, 0.5, 0.95):
        assert torch.equal(mask(values, threshold), ((values + 1) / 2 > threshold).float())


def test_a_scribble_lies_on_the_thickened_edges_and_keeps_all_or_none_of_them():
    x, inside = _square(h=16, w=16, top=4, left=4, size=8)
    thick = torch.nn.functional.max_pool2d(edges(x, 0.2), 3, stride=1, padding=1)
    assert torch.equal(scribble(x, 0.2, 1.0), thick) and not scribble(x, 0.2, 0.0).any()
    g = torch.Generator().manual_seed(0)
    part = scribble(x.expand(8, -1, -1, -1), 0.2, 0.5, g)
    assert (part <= thick).all() and 0 < part.sum() < thick.sum() * 8
    again = scribble(x.expand(8, -1, -1, -1), 0.2, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(part, again)


def test_the_configured_detector_gives_controls_in_0_1_with_the_control_channels():
    cfg = load_config("mnist", ["controlnet.detector=blur", "controlnet.control_channels=3"])
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    c = detector(cfg)(x)
    assert c.shape == (2, 3, 28, 28) and c.min() >= 0 and c.max() <= 1 and torch.equal(c[:, 0], c[:, 2])
    assert torch.equal(as_channels(torch.ones(1, 3, 2, 2), 1), torch.ones(1, 1, 2, 2))


def _pairs(root, names=("a/1.png", "a/2.png", "b/3.png"), missing=()):
    for name in names:
        for kind, value in (("images", 200), ("control", 60)):
            if kind == "control" and name in missing:
                continue
            path = root / kind / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((10, 10), value + int(name[-5]), np.uint8)).save(path)
    return root / "images"


def test_a_paired_folder_gives_each_image_the_control_picture_of_its_name(tmp_path):
    cfg = load_config("mnist", ["data.dataset=folder", f"data.path={_pairs(tmp_path)}", "data.image_size=[8,8]",
                                "data.channels=1", "controlnet.detector=null"])
    assert control_folder(cfg) == (tmp_path / "control").resolve()
    ds = PairedControls(build_dataset(cfg), control_folder(cfg), 1)
    for i, name in enumerate(["a/1.png", "a/2.png", "b/3.png"]):
        x, y, c = ds[i]
        assert c.shape == (1, 8, 8) and torch.allclose(c, torch.full_like(c, (60 + int(name[-5])) / 255))
        assert torch.allclose((x + 1) / 2, torch.full_like(x, (200 + int(name[-5])) / 255), atol=1e-6)
        assert int(y) == (0 if name.startswith("a") else 1)


def test_a_missing_control_picture_is_refused_naming_it(tmp_path):
    cfg = load_config("mnist", ["data.dataset=folder", f"data.path={_pairs(tmp_path, missing=('b/3.png',))}",
                                "data.image_size=[8,8]", "data.channels=1", "controlnet.detector=null"])
    with pytest.raises(DataError, match=r"1 of 3 images have no control picture \(e.g. '.*control/b/3.png'\)"):
        PairedControls(build_dataset(cfg), control_folder(cfg), 1)


def test_a_control_picture_of_another_size_is_fitted_with_a_note(tmp_path):
    picture = np.zeros((20, 40), np.uint8)
    picture[:, 5:35] = 255  # the centre crop of 20x20 (and the filter's reach around it) is all white
    Image.fromarray(picture).save(tmp_path / "c.png")
    notes = []
    c = read_control(tmp_path / "c.png", (1, 8, 8), notes.append)
    assert c.shape == (1, 1, 8, 8) and torch.allclose(c, torch.ones_like(c), atol=1 / 255)
    assert len(notes) == 1 and "40x20 pixels; scaled and center-cropped to 8x8" in notes[0]
    assert read_control(tmp_path / "c.png", (3, 20, 40), notes.append).shape == (1, 3, 20, 40) and len(notes) == 1
    with pytest.raises(DataError, match="does not exist"):
        read_control(tmp_path / "nothing.png", (1, 8, 8))
