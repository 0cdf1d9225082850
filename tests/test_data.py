"""Tests for ddpmlab.data: bundled sets, toy sets, image folders, uint8 helpers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.config import Config
from ddpmlab.data import (
    ImageFolderDataset,
    InMemoryDataset,
    build_dataset,
    data_shape,
    from_uint8,
    load_digits,
    load_mnist,
    make_toy,
    to_uint8,
)
from ddpmlab.data.toy import TOY_NAMES
from ddpmlab.errors import DataError

# ---------------------------------------------------------------- bundled sets

def test_mnist_has_5000_digits_all_labels_in_range():
    x, y = load_mnist()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert sorted(y.unique().tolist()) == list(range(10))
    assert x.min().item() == -1.0 and x.max().item() == 1.0


def test_mnist_train_test_split_disjoint_4500_500_stratified_deterministic():
    xa, ya = load_mnist("all")
    xtr, ytr = load_mnist("train")
    xte, yte = load_mnist("test")
    assert len(xtr) == 4500 and len(xte) == 500
    assert torch.bincount(yte).tolist() == [50] * 10
    # disjoint and together all: compare images as byte strings
    rows = lambda t: {r.numpy().tobytes() for r in t.reshape(len(t), -1)}  # noqa: E731
    tr, te, al = rows(xtr), rows(xte), rows(xa)
    assert not (tr & te)
    assert tr | te == al
    xte2, yte2 = load_mnist("test")
    assert torch.equal(xte, xte2) and torch.equal(yte, yte2)


def test_bad_split_raises_data_error():
    with pytest.raises(DataError, match="split"):
        load_mnist("validation")


def test_digits_are_8x8_in_range_with_all_labels():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    xtr, _ = load_digits("train")
    xte, _ = load_digits("test")
    assert len(xtr) + len(xte) == 1797 and 150 < len(xte) < 200


# ---------------------------------------------------------------- uint8 helpers

def test_uint8_round_trip_exact_on_all_256_levels():
    levels = np.arange(256, dtype=np.uint8)
    arr = np.stack([np.tile(levels, (4, 1))] * 3, axis=-1)[None]  # (1, 4, 256, 3)
    x = from_uint8(arr)
    assert x.shape == (1, 3, 4, 256) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    back = to_uint8(x)
    assert back.dtype == np.uint8 and back.shape == arr.shape
    assert np.array_equal(back, arr)
    assert torch.equal(from_uint8(back), x)


def test_to_uint8_clamps_and_handles_single_image():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, float("nan")]).reshape(1, 1, 6)
    out = to_uint8(x)
    assert out.shape == (1, 6, 1)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255, 128]


# ---------------------------------------------------------------- toy sets

@pytest.mark.parametrize("name", TOY_NAMES)
def test_toy_sets_have_requested_shape_and_unit_scale(name):
    x = make_toy(name, 4000, noise=0.05, seed=1)
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    std = x.std(0)
    assert ((std > 0.5) & (std < 2.0)).all(), std
    assert x.mean(0).abs().max() < 0.5
    y = make_toy(name, 4000, noise=0.05, seed=2)
    assert not torch.allclose(x, y)
    assert torch.equal(x, make_toy(name, 4000, noise=0.05, seed=1))


def test_toy_scale_is_fixed_not_data_dependent():
    small = make_toy("ring", 16, seed=3)
    big = make_toy("ring", 20000, seed=3)
    radius_small = small.norm(dim=1).mean().item()
    radius_big = big.norm(dim=1).mean().item()
    assert abs(radius_small - radius_big) < 0.1


def test_unknown_toy_name_lists_valid_names():
    with pytest.raises(DataError) as e:
        make_toy("spiral", 10)
    for name in TOY_NAMES:
        assert name in str(e.value)


# ---------------------------------------------------------------- image folders

def _solid(size, colour, mode="RGB"):
    return Image.new(mode, size, colour)


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kw)


def test_folder_rgb_png_exact_pixels_when_size_matches(tmp_path):
    rng = np.random.RandomState(0)
    arr = rng.randint(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    ds = _quiet(ImageFolderDataset, tmp_path, (16, 16), 3)
    assert len(ds) == 1 and ds.num_classes == 0 and ds.class_names == []
    assert ds.sample_shape == (3, 16, 16) and ds.is_image
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.item() == 0
    assert np.array_equal(to_uint8(x[None])[0], arr)


def test_folder_handles_many_modes_and_formats(tmp_path):
    _solid((20, 20), (200, 40, 10)).save(tmp_path / "rgb.png")
    _solid((24, 24), 90, "L").save(tmp_path / "gray.jpg", quality=95)
    _solid((20, 20), (10, 20, 30, 128), "RGBA").save(tmp_path / "rgba.png")
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(tmp_path / "deep16.png")
    _solid((16, 16), (0, 0, 0, 255), "CMYK").save(tmp_path / "cmyk.jpg")
    _solid((16, 16), (1, 2, 3)).save(tmp_path / "b.BMP")
    _solid((16, 16), (0, 255, 0)).save(tmp_path / "c.gif")
    _solid((16, 16), (0, 0, 255)).save(tmp_path / "d.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = _quiet(ImageFolderDataset, tmp_path, (8, 8), 3)
    assert len(ds) == 9 and ds.skipped == []
    got = {p.split("/")[-1]: ds.get_uint8(i) for i, p in enumerate(ds.files)}
    assert all(a.shape == (8, 8, 3) and a.dtype == np.uint8 for a in got.values())
    mean = {k: v.reshape(-1, 3).mean(0) for k, v in got.items()}
    assert np.allclose(mean["rgb.png"], (200, 40, 10), atol=1)
    assert np.allclose(mean["gray.jpg"], 90, atol=3)
    assert np.allclose(mean["rgba.png"], (10, 20, 30), atol=1)
    assert np.allclose(mean["palette.png"], (250, 5, 5), atol=1)
    assert np.allclose(mean["deep16.png"], 128, atol=1)  # 32896 / 257 = 128
    assert np.allclose(mean["cmyk.jpg"], 0, atol=3)  # full K ink = black
    assert np.allclose(mean["b.BMP"], (1, 2, 3), atol=1)
    assert np.allclose(mean["c.gif"], (0, 255, 0), atol=1)
    assert np.allclose(mean["d.webp"], (0, 0, 255), atol=1)


def test_folder_16bit_png_scaled_to_8bit_over_full_range(tmp_path):
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    ds = _quiet(ImageFolderDataset, tmp_path, (16, 16), 1)
    a = ds.get_uint8(0)
    assert a.shape == (16, 16, 1)
    assert a.min() == 0 and a.max() == 255
    assert np.all(np.diff(a.reshape(-1).astype(int)) >= 0)


def test_folder_channel_conversion_1_3_4(tmp_path):
    _solid((12, 12), (255, 0, 0, 0), "RGBA").save(tmp_path / "clear_red.png")
    pal = Image.new("P", (12, 12), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "clear_palette.png", transparency=0)
    for ch in (1, 3, 4):
        ds = _quiet(ImageFolderDataset, tmp_path, (6, 6), ch)
        assert ds.sample_shape == (ch, 6, 6)
        x, _ = ds[0]
        assert x.shape == (ch, 6, 6)
        assert x.min() >= -1 and x.max() <= 1
    ds4 = ImageFolderDataset(tmp_path, (6, 6), 4)
    by_name = {p.split("/")[-1]: ds4.get_uint8(i) for i, p in enumerate(ds4.files)}
    assert (by_name["clear_red.png"][..., 3] == 0).all()
    assert (by_name["clear_palette.png"][..., 3] == 0).all()
    # channels 3 drops alpha and keeps the colour stored under it
    ds3 = ImageFolderDataset(tmp_path, (6, 6), 3)
    rgb = {p.split("/")[-1]: ds3.get_uint8(i) for i, p in enumerate(ds3.files)}
    assert (rgb["clear_red.png"] == (255, 0, 0)).all()
    assert (rgb["clear_palette.png"] == (10, 20, 30)).all()
    ds1 = ImageFolderDataset(tmp_path, (6, 6), 1)
    red = {p.split("/")[-1]: ds1.get_uint8(i) for i, p in enumerate(ds1.files)}["clear_red.png"]
    assert np.allclose(red, 76, atol=1)  # ITU-R 601 luma of pure red


@pytest.mark.parametrize("size", [(32, 32), (16, 16), (16, 24)])
def test_folder_center_crop_drops_left_right_borders(tmp_path, size):
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :, 1] = 200  # green middle
    arr[:, :8] = (255, 0, 0)  # red borders, 8 px each side (lost by a 32x32 crop)
    arr[:, -8:] = (255, 0, 0)
    Image.fromarray(arr).save(tmp_path / "wide.png")
    ds = _quiet(ImageFolderDataset, tmp_path, size, 3)
    a = ds.get_uint8(0).astype(int)
    assert a.shape == (*size, 3)
    # cover-then-crop keeps the middle: columns 16..48 for a square, 12..52 for 16x24
    assert a[..., 0].max() <= 60, "red border should be cropped away"
    assert np.abs(a[..., 1] - 200).max() <= 40


def test_folder_center_crop_portrait(tmp_path):
    arr = np.zeros((40, 20), dtype=np.uint8)
    arr[10:30] = 255  # white middle band, black top/bottom borders
    Image.fromarray(arr).save(tmp_path / "tall.png")
    a = _quiet(ImageFolderDataset, tmp_path, (20, 20), 1).get_uint8(0)
    assert a.min() >= 250


def test_folder_applies_exif_orientation(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # stored: white left half, black right half
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: white ends up on top
    img.save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    a = _quiet(ImageFolderDataset, tmp_path, (40, 20), 1).get_uint8(0)[..., 0].astype(int)
    assert a[:16].mean() > 230 and a[24:].mean() < 25


def test_folder_subfolders_give_labels_and_class_names(tmp_path):
    for name, colour in (("dog", (0, 0, 200)), ("cat", (200, 0, 0))):
        (tmp_path / name).mkdir()
        for i in range(3):
            _solid((10, 10), colour).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "nested").mkdir()
    _solid((10, 10), (200, 0, 0)).save(tmp_path / "cat" / "nested" / "deep.PNG")
    (tmp_path / "empty_logs").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "x.png").write_bytes(b"garbage")
    (tmp_path / "cat" / "._0.png").write_bytes(b"macos resource fork")
    ds = _quiet(ImageFolderDataset, tmp_path, (8, 8), 3)
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert len(ds) == 7 and ds.skipped == []
    assert ds.labels.tolist() == [0, 0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        x, y = ds[i]
        red = x[0].mean().item() > 0
        assert (y.item() == 0) == red
    # an image lying directly in root is ignored (with a warning) once sub-folders are classes
    _solid((10, 10), (0, 0, 0)).save(tmp_path / "loose.png")
    with pytest.warns(UserWarning, match="ignored"):
        ds2 = ImageFolderDataset(tmp_path, (8, 8), 3)
    assert len(ds2) == 7


def test_folder_skips_truncated_and_garbage_files(tmp_path):
    for i in range(3):
        _solid((32, 32), (i * 50, 0, 0)).save(tmp_path / f"good{i}.png")
    rng = np.random.RandomState(0)
    Image.fromarray(rng.randint(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.jpg").write_bytes(b"this is not a jpeg at all" * 10)
    with pytest.warns(UserWarning, match="skipped 2 of 5") as rec:
        ds = ImageFolderDataset(tmp_path, (8, 8), 3)
    assert len(rec) == 1
    assert len(ds) == 3
    skipped = sorted(p.split("/")[-1] for p, _ in ds.skipped)
    assert skipped == ["cut.png", "garbage.jpg"]
    assert all(isinstance(r, str) and r and "\n" not in r for _, r in ds.skipped)
    # the same without the in-memory cache
    with pytest.warns(UserWarning):
        lazy = ImageFolderDataset(tmp_path, (8, 8), 3, cache=False)
    assert not lazy.cached and lazy.arrays is None and len(lazy) == 3
    for i in range(3):
        assert torch.equal(lazy[i][0], ds[i][0])


def test_folder_with_only_unreadable_files_raises(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(DataError, match="could be read") as e:
        ImageFolderDataset(tmp_path, (8, 8), 3)
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)


def test_missing_folder_raises_data_error_with_path(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DataError, match="does not exist") as e:
        ImageFolderDataset(missing, (8, 8), 3)
    assert str(missing) in str(e.value) and "\n" not in str(e.value)


def test_empty_folder_raises_data_error_with_path_and_extensions(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match="no image files") as e:
        ImageFolderDataset(tmp_path, (8, 8), 3)
    assert str(tmp_path) in str(e.value) and ".png" in str(e.value)


def test_file_instead_of_folder_raises_data_error(tmp_path):
    f = tmp_path / "one.png"
    _solid((8, 8), (0, 0, 0)).save(f)
    with pytest.raises(DataError, match="not a folder") as e:
        ImageFolderDataset(f, (8, 8), 3)
    assert str(f) in str(e.value)


# ---------------------------------------------------------------- build_dataset

def _cfg(**data):
    cfg = Config()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def test_build_dataset_mnist_digits_toy_attributes_match_data_shape():
    for cfg, n, classes, is_image in (
        (_cfg(dataset="mnist", split="test"), 500, 10, True),
        (_cfg(dataset="digits"), 1797, 10, True),
        (_cfg(dataset="toy", toy="moons", toy_samples=300), 300, 0, False),
    ):
        ds = build_dataset(cfg)
        assert len(ds) == n and ds.num_classes == classes and ds.is_image is is_image
        assert ds.sample_shape == data_shape(cfg)
        assert len(ds.class_names) == classes
        x, y = ds[0]
        assert tuple(x.shape) == ds.sample_shape and y.dtype == torch.int64
    toy = build_dataset(_cfg(dataset="toy", toy_samples=50))
    assert isinstance(toy, InMemoryDataset) and (toy.y == 0).all()
    assert data_shape(_cfg(dataset="mnist")) == (1, 28, 28)
    assert data_shape(_cfg(dataset="digits")) == (1, 8, 8)
    assert data_shape(_cfg(dataset="toy")) == (2,)


def test_build_dataset_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    _solid((20, 30), (5, 5, 5)).save(tmp_path / "a" / "x.png")
    _solid((30, 20), (250, 250, 250)).save(tmp_path / "b" / "y.jpg")
    cfg = _cfg(dataset="folder", path=str(tmp_path), image_size=[12, 10], channels=1)
    assert data_shape(cfg) == (1, 12, 10)
    ds = build_dataset(cfg)
    assert ds.sample_shape == (1, 12, 10) and ds.num_classes == 2 and ds.class_names == ["a", "b"]
    assert ds.is_image and len(ds) == 2
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    x, y = next(iter(loader))
    assert x.shape == (2, 1, 12, 10) and y.tolist() == [0, 1]
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(_cfg(dataset="folder", path=str(tmp_path / "gone")))
