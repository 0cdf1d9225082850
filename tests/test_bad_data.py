"""A folder of real-world images: the good ones are used (converted), the bad ones skipped with a
reason and reported once; `ddpm data check` reports the same without training."""

import os
import struct
import subprocess
import warnings
import zlib

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from ddpmlab.cli import main
from ddpmlab.data import ImageFolderDataset
from ddpmlab.errors import DataError, OptionError
from ddpmlab.io.images import load_mask, load_picture


def _png_header_only(path, width, height):
    """A PNG whose header claims width x height (a decompression bomb's signature); no real pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


GOOD = {  # file -> expected mean RGB after conversion
    "rgb.png": (200, 40, 10), "deep16.png": (128, 128, 128), "palette.png": (250, 5, 5),
    "rgba.png": (10, 20, 30), "cmyk.jpg": (0, 0, 0), "tiny.png": (30, 60, 90),
}
BAD = {  # file -> words its reason must contain
    "truncated.png": "truncated", "text.jpg": "cannot identify", "bomb.png": "decompression-bomb limit",
    "bomb_warns.png": "decompression-bomb limit",
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    d = tmp_path_factory.mktemp("zoo")
    Image.new("RGB", (20, 20), (200, 40, 10)).save(d / "rgb.png")
    Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)).save(d / "deep16.png")  # 16-bit: 32896/257 = 128
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 0, 0, 250, 5, 5] + [0] * 762)
    pal.save(d / "palette.png")
    Image.new("RGBA", (16, 16), (10, 20, 30, 128)).save(d / "rgba.png")
    Image.new("CMYK", (16, 16), (0, 0, 0, 255)).save(d / "cmyk.jpg")  # full black ink
    Image.new("RGB", (2, 2), (30, 60, 90)).save(d / "tiny.png")  # smaller than the target: upscaled
    photo = np.zeros((12, 24, 3), dtype=np.uint8)
    photo[:, :12] = 255  # stored: white left half; EXIF orientation 6 shows it rotated: white on top
    img = Image.fromarray(photo)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(d / "rotated.jpg", exif=exif.tobytes(), quality=95)
    noise = np.random.RandomState(0).randint(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "truncated.png")
    (d / "truncated.png").write_bytes((d / "truncated.png").read_bytes()[:3000])
    (d / "text.jpg").write_text("this is a text file with an image extension")
    _png_header_only(d / "bomb.png", 30000, 30000)  # 900 Mpx: over 2x MAX_IMAGE_PIXELS, Pillow raises
    _png_header_only(d / "bomb_warns.png", 10000, 10000)  # 100 Mpx: over 1x, Pillow only warns
    (d / "notes.txt").write_text("not an image and not pretending")
    return d


def test_good_images_are_used_and_bad_ones_skipped_with_reasons_reported_once(zoo):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(zoo, (8, 8), 3)
    names = {p.split("/")[-1]: i for i, p in enumerate(ds.files)}
    assert set(names) == set(GOOD) | {"rotated.jpg"}
    for name, rgb in GOOD.items():
        assert np.allclose(ds.get_uint8(names[name]).reshape(-1, 3).mean(0), rgb, atol=2), name
    skipped = {p.split("/")[-1]: r for p, r in ds.skipped}
    assert set(skipped) == set(BAD)
    for name, words in BAD.items():
        assert words in skipped[name], skipped[name]
    reports = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(reports) == 1 and len(caught) == 1  # one report at start-up, no stray Pillow warnings
    assert all(f"{zoo / name}: {skipped[name]}" in reports[0] for name in BAD)  # a list, a reason each


def test_exif_rotation_is_applied(zoo):
    with pytest.warns(UserWarning, match="skipped 4"):
        ds = ImageFolderDataset(zoo, (24, 12), 1)  # (H, W): the rotated photo is 12 wide, 24 tall
    rotated = ds.get_uint8([p.endswith("rotated.jpg") for p in ds.files].index(True))[..., 0].astype(int)
    assert rotated[:10].mean() > 230 and rotated[14:].mean() < 25  # white on top, black below


def test_data_check_reports_without_training(zoo, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "check", str(zoo), "--image-size", "8", "8", "--channels", "1"]) == 0
    out = capsys.readouterr().out
    assert "usable: 7 of 11 image files" in out
    assert "upscaled: 1 smaller than 8x8" in out and "tiny.png 2x2" in out
    assert "ignored: 1 file(s)" in out and "notes.txt" in out
    assert "skipped 4" in out and all(f"{name}: " in out for name in BAD)
    assert not (tmp_path / "runs").exists()


def test_data_check_fails_without_usable_images(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert main(["data", "check", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "a.png: " in out and "no usable images" in out
    assert main(["data", "check", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_training_on_a_folder_without_usable_images_is_an_error(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_text("not a jpeg")
    rc = main(["train", "data.dataset=folder", f"data.path={tmp_path / 'imgs'}", "data.image_size=[8,8]",
               f"train.out_dir={tmp_path / 'runs'}", "train.name=r", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "none of the 1 image files" in err and "a.jpg" in err and len(err.splitlines()) == 1


def test_zero_usable_error_carries_the_skip_list(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError) as e:
        ImageFolderDataset(tmp_path, (8, 8), 3)
    assert [p.split("/")[-1] for p, _ in e.value.skipped] == ["x.png"]


# ------------------------------------------------------------------------------ hostile files

EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 0 lineto 8 8 lineto closepath fill\n%%EOF\n")  # Pillow renders it with Ghostscript


@pytest.fixture
def programs_started(monkeypatch):
    """The command lines of every program started while the test runs (none is started)."""
    started = []

    def popen(args, *_, **__):
        started.append(args)
        raise FileNotFoundError(f"this test starts no program, asked for {args}")

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # not looked up yet: Pillow would run `gs --version`
    return started


def test_a_postscript_file_is_refused_without_starting_a_program(tmp_path, programs_started):
    for name in ("upload.eps", "named_like.png"):
        (tmp_path / name).write_bytes(EPS)
        with pytest.raises(OptionError, match=rf"image '.*{name}' is not a readable image") as e:
            load_picture(tmp_path / name, (1, 8, 8))  # ddpm inpaint --image, the demo's uploads
        assert "\n" not in str(e.value)
        with pytest.raises(OptionError, match="is not a readable image"):
            load_mask(tmp_path / name, (8, 8))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(EPS)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "data" / "b.png")
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        ds = ImageFolderDataset(tmp_path / "data", (8, 8), 3)
    assert [os.path.basename(p) for p in ds.files] == ["b.png"] and "cannot identify" in ds.skipped[0][1]
    assert programs_started == []


def test_a_picture_over_the_bomb_limit_is_refused_in_one_line_before_any_pixel_is_decoded(tmp_path, monkeypatch):
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self, *a, **k: decoded.append(self.size))
    _png_header_only(tmp_path / "warns.png", 10000, 10000)  # 1x-2x the limit: Pillow itself only warns
    _png_header_only(tmp_path / "bomb.png", 30000, 30000)  # over 2x: Pillow raises DecompressionBombError
    for name, pixels in (("warns.png", 10**8), ("bomb.png", 9 * 10**8)):
        for load in (lambda p: load_picture(p, (3, 8, 8), resize=True), lambda p: load_mask(p, (8, 8), True)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with pytest.raises(OptionError, match=rf"'.*{name}' is too large: {pixels} pixels exceeds Pillow's "
                                                      r"decompression-bomb limit .*; give a smaller picture") as e:
                    load(tmp_path / name)
            assert "\n" not in str(e.value)
    assert decoded == []


def test_links_out_of_the_data_folder_are_not_followed_and_unlistable_folders_are_reported(tmp_path, monkeypatch):
    private, data = tmp_path / "private", tmp_path / "data"
    private.mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(private / "secret.png")
    for sub in ("cats", "cats/inner", "cats/locked"):
        (data / sub).mkdir(parents=True)
    Image.new("RGB", (8, 8), (200, 0, 0)).save(data / "cats" / "a.png")
    Image.new("RGB", (8, 8), (0, 200, 0)).save(data / "cats" / "locked" / "b.png")
    (data / "cats" / "inner" / "same.png").symlink_to(data / "cats" / "a.png")  # inside: followed
    (data / "cats" / "out.png").symlink_to(private / "secret.png")
    (data / "cats" / "outdir").symlink_to(private)
    (data / "dogs").symlink_to(private)  # a class folder that leads out
    scandir = os.scandir

    def unlistable(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", unlistable)  # what os.walk lists a folder with (root would read 0o000)
    with pytest.warns(UserWarning, match="skipped 4 of 6 image files"):
        ds = ImageFolderDataset(data, (8, 8), 3)
    assert ds.class_names == ["cats"]
    assert [os.path.relpath(p, data) for p in ds.files] == ["cats/a.png", "cats/inner/same.png"]
    reasons = {os.path.relpath(p, data): r for p, r in ds.skipped}
    assert set(reasons) == {"cats/out.png", "cats/outdir", "dogs", "cats/locked"}
    for name in ("cats/out.png", "cats/outdir", "dogs"):
        assert reasons[name].startswith("not followed: a symbolic link to") and "outside data.path" in reasons[name]
    assert reasons["cats/locked"] == "cannot list folder (Permission denied); check its permissions"
