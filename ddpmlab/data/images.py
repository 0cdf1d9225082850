"""A folder of images as a dataset.

``root`` is scanned recursively for image files (extensions in :data:`IMAGE_EXTENSIONS`,
any case; hidden files/folders and ``__MACOSX`` are ignored).  When ``root`` has
sub-folders holding images, each first-level sub-folder is a class (sorted names ->
labels 0, 1, ...) and files lying directly in ``root`` are ignored (with a warning),
as torchvision's ImageFolder does; without such sub-folders the set is unlabeled
(``class_names == []``, ``num_classes == 0``, every label 0).

Every file is fully decoded once at scan time (in a few threads); files that fail are
skipped, listed in ``self.skipped`` as ``(path, reason)`` and reported in one warning
(``ddpm data check DIR`` prints the same report without training).  Files are opened as
:data:`RASTER_FORMATS` only (:func:`open_image`: Pillow never hands one to another program),
and images over Pillow's decompression-bomb limit (``PIL.Image.MAX_IMAGE_PIXELS``, ~89
megapixels) are skipped from their header, before any pixel is decoded; images smaller than
``image_size`` are upscaled, never skipped.  Symbolic links that lead out of ``root`` are not
followed, and folders that cannot be listed are reported: both among the skipped entries.
Each image is EXIF-rotated, converted to L / RGB / RGBA (palette, 16-bit, CMYK, ...
handled), resized with bicubic antialiasing so that it covers ``image_size`` and
center-cropped.  Up to :data:`CACHE_MAX_IMAGES` images (and :data:`CACHE_MAX_BYTES`)
are kept in memory as one uint8 array; larger folders are decoded again on access.
"""

from __future__ import annotations

import os
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

from ddpmlab.errors import DataError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
CACHE_MAX_IMAGES = 20000
CACHE_MAX_BYTES = 4 * 1024**3
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # Pillow mode of an image with that many channels
_SKIP_DIRS = {"__MACOSX"}
# what a picture may be: formats Pillow decodes itself (EPS and other PostScript-like formats would start
# Ghostscript where it is installed), so a file of any other format is refused whatever its name says
RASTER_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")


class ImageTooLarge(ValueError):
    """A picture over Pillow's decompression-bomb limit, refused from its header before any pixel is decoded."""

    def __init__(self, pixels: Optional[int]):
        self.pixels = pixels
        what = "the image" if pixels is None else f"{pixels} pixels"
        super().__init__(f"too large: {what} exceeds Pillow's decompression-bomb limit "
                         f"PIL.Image.MAX_IMAGE_PIXELS={Image.MAX_IMAGE_PIXELS}")


def open_image(path) -> Image.Image:
    """``Image.open`` for a file from anywhere: only :data:`RASTER_FORMATS` are tried (another format is an
    ``UnidentifiedImageError``), and a picture over ``PIL.Image.MAX_IMAGE_PIXELS`` is refused from its header
    (:class:`ImageTooLarge`) before any pixel is decoded; Pillow alone decodes the 1-2x range after a warning."""
    try:
        img = Image.open(path, formats=RASTER_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # the warning where it is an error
        size = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLarge(int(size.group(1)) if size else None) from None
    pixels = img.width * img.height
    if Image.MAX_IMAGE_PIXELS and pixels > Image.MAX_IMAGE_PIXELS:
        img.close()
        raise ImageTooLarge(pixels)
    return img


def is_hidden(name: str) -> bool:
    """A hidden file or folder (a leading dot, or ``__MACOSX``): never scanned."""
    return name.startswith(".") or name in _SKIP_DIRS


def _is_image_file(name: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> bool:
    return not is_hidden(name) and name.lower().endswith(tuple(extensions))


def _outside(path: str, root: str) -> bool:
    """Whether ``path`` (a link or below one) resolves to a place outside the folder ``root`` (a real path)."""
    real = os.path.realpath(path)
    return real != root and not real.startswith(root.rstrip(os.sep) + os.sep)


def _link_out(path: str) -> tuple[str, str]:
    return path, (f"not followed: a symbolic link to '{os.path.realpath(path)}', outside data.path; "
                  "copy the files into the folder or point data.path at them")


def _walk_images(folder: str, root: str,
                 extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], list[tuple[str, str]]]:
    """(all files of ``extensions`` below ``folder``, sorted; (path, reason) of what was not used): symbolic
    links are followed once where they stay inside ``root`` (a real path), never out of it; a folder that
    cannot be listed is reported, not passed over in silence."""
    found: list[str] = []
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()

    def unlisted(e: OSError) -> None:
        problems.append((str(e.filename or folder), f"cannot list folder ({e.strerror or e}); check its permissions"))

    for dirpath, dirnames, filenames in os.walk(folder, onerror=unlisted, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        paths = {d: os.path.join(dirpath, d) for d in sorted(dirnames) if not is_hidden(d)}
        problems += [_link_out(p) for p in paths.values() if os.path.islink(p) and _outside(p, root)]
        dirnames[:] = [d for d, p in paths.items() if not (os.path.islink(p) and _outside(p, root))]
        for path in (os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_file(f, extensions)):
            if os.path.islink(path) and _outside(path, root):
                problems.append(_link_out(path))
            else:
                found.append(path)
    return sorted(found), problems


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any PIL image to ``mode`` (L, RGB or RGBA) with 8 bits per channel."""
    if img.mode == mode:
        return img
    if img.mode.startswith("I") or img.mode == "F":
        arr = np.asarray(img)
        # 16-bit data (I;16*, or mode I holding 16-bit PNG values): scale 0..65535 -> 0..255
        if img.mode.startswith("I;16") or (img.mode == "I" and arr.size and arr.max() > 255):
            arr = arr.astype(np.float64) / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "L")
    elif img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "RGBX", "RGBa", "La"):
        # CMYK, YCbCr, LAB, HSV, ...: go through RGB
        try:
            img = img.convert("RGB")
        except (ValueError, OSError):
            img = img.convert("RGBA").convert("RGB")
    return img if img.mode == mode else img.convert(mode)


def _fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale so the image covers ``size`` = (H, W), then center-crop to it (one resample)."""
    h, w = size
    iw, ih = img.size
    if (iw, ih) == (w, h):
        return img
    scale = max(h / ih, w / iw)
    crop_w, crop_h = w / scale, h / scale
    left, top = (iw - crop_w) / 2.0, (ih - crop_h) / 2.0
    box = (left, top, left + crop_w, top + crop_h)
    return img.resize((w, h), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def load_image(path: str, image_size: Sequence[int], channels: int = 3) -> np.ndarray:
    """Decode one file to a uint8 array ``(H, W, C)``; raises on unreadable files."""
    mode = CHANNEL_MODES[channels]
    with open_image(path) as img:
        img.load()
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # a broken EXIF block: keep the pixels as stored
            oriented = img
        out = _fit(to_mode(oriented, mode), (int(image_size[0]), int(image_size[1])))
        arr = np.array(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _try_load(path: str, image_size, channels) -> tuple[Optional[np.ndarray], Optional[str]]:
    try:
        return load_image(path, image_size, channels), None
    except ImageTooLarge as e:
        return None, str(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
        reason = " ".join(str(e).split()) or "unreadable"
        return None, f"{type(e).__name__}: {reason}"


def skip_report(skipped: Sequence[tuple[str, str]], limit: int = 20, indent: str = "  ") -> str:
    """One line per skipped file, ``path: reason``, at most ``limit`` (0: all) and a count of the rest."""
    shown = skipped if limit <= 0 else skipped[:limit]
    lines = [f"{indent}{p}: {r}" for p, r in shown]
    if len(skipped) > len(shown):
        lines.append(f"{indent}... and {len(skipped) - len(shown)} more (list them all with `ddpm data check`)")
    return "\n".join(lines)


def _check_folder(root: str, kind: str = "image") -> None:
    if not os.path.exists(root):
        raise DataError(
            f"data.path: folder '{root}' does not exist; check the path (relative paths start "
            f"from '{os.getcwd()}') or set data.path to a folder of {kind}s"
        )
    if not os.path.isdir(root):
        raise DataError(f"data.path: '{root}' is a file, not a folder; set data.path to the folder that holds the "
                        f"{kind}s")


def scan_folder(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                kind: str = "image") -> tuple[list[str], list[int], list[str], list[tuple[str, str]]]:
    """(files, labels, class names, (path, reason) of what is not used) of a folder, without decoding any:
    its first-level sub-folders that hold at least one image (recursively) are the classes; without any,
    the images directly in it, unlabeled.  Links out of ``root`` and unlistable folders are the not used.
    ``extensions`` and ``kind`` (the word of the messages): another kind of file, e.g. sound files."""
    _check_folder(root, kind)
    try:
        entries = sorted(os.listdir(root))
    except OSError as e:
        raise DataError(f"data.path: cannot list folder '{root}' ({e.strerror}); check its permissions") from None
    real = os.path.realpath(root)
    paths = {e: os.path.join(root, e) for e in entries if not is_hidden(e)}
    problems = [_link_out(p) for p in paths.values() if os.path.islink(p) and _outside(p, real)]
    paths = {e: p for e, p in paths.items() if not (os.path.islink(p) and _outside(p, real))}
    top_files = [p for e, p in paths.items() if _is_image_file(e, extensions) and os.path.isfile(p)]
    class_files: dict[str, list[str]] = {}
    for e, sub in paths.items():
        if os.path.isdir(sub):
            files, missed = _walk_images(sub, real, extensions)
            problems += missed
            if files:
                class_files[e] = files
    if not class_files:
        files, labels, class_names = top_files, [0] * len(top_files), []
    else:
        class_names = sorted(class_files)
        files, labels = [], []
        for label, name in enumerate(class_names):
            files += class_files[name]
            labels += [label] * len(class_files[name])
        if top_files:
            warnings.warn(
                f"data.path: {len(top_files)} {kind}(s) directly in '{root}' are ignored because "
                f"its sub-folders are used as classes ({', '.join(class_names[:5])}"
                f"{', ...' if len(class_names) > 5 else ''}); move them into a sub-folder",
                stacklevel=3,
            )
    if not files:
        missed = f" ('{problems[0][0]}' {problems[0][1]})" if problems else ""
        raise DataError(
            f"data.path: folder '{root}' contains no {kind} files (searched recursively for "
            f"{', '.join(extensions)}, any case){missed}; add {kind}s or point data.path at another folder"
        )
    return files, labels, class_names, problems


def _decode_all(files: Sequence[str], image_size: tuple[int, int], channels: int, cached: bool,
                threads: int) -> tuple[list[int], list[tuple[str, str]], Optional[np.ndarray]]:
    """Decode every file once (in ``threads`` threads): (indices of the files kept, skipped
    (path, reason) pairs, the kept images as uint8 (N, H, W, C) when ``cached``)."""
    n = len(files)
    keep, skipped = [], []
    arrays = np.empty((n, *image_size, channels), dtype=np.uint8) if cached else None

    def work(i: int):
        return i, _try_load(files[i], image_size, channels)

    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=threads) as pool:
        # Pillow only warns of a file between 1x and 2x the decompression-bomb limit: open_image refuses it, silently
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, (arr, reason) in pool.map(work, range(n)):
            if arr is None:
                skipped.append((files[i], reason))
                continue
            if arrays is not None:
                arrays[len(keep)] = arr
            keep.append(i)
    if arrays is not None and len(keep) < n:
        arrays = arrays[: len(keep)].copy()  # release the unused tail
    return keep, skipped, arrays


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images below ``root``; ``ds[i]`` is ``(x, y)``: x float32 ``(C,H,W)`` in [-1,1], y int64."""

    def __init__(self, root, image_size: Sequence[int] = (32, 32), channels: int = 3,
                 cache: Optional[bool] = None, num_threads: Optional[int] = None):
        if channels not in CHANNEL_MODES:
            raise DataError(f"data.channels: must be 1, 3 or 4, got {channels}")
        if len(image_size) != 2 or any(int(s) <= 0 for s in image_size):
            raise DataError(f"data.image_size: must be [H, W] with positive integers, got {list(image_size)}")
        self.root = root = str(Path(os.path.expanduser(str(root))))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self.sample_shape = (self.channels, *self.image_size)
        self.is_image = True
        files, labels, self.class_names, problems = scan_folder(root)
        self.num_classes = len(self.class_names)

        # decode everything once: validates every file, and fills the cache
        n = len(files)
        if cache is None:
            per_image = self.image_size[0] * self.image_size[1] * self.channels
            cache = n <= CACHE_MAX_IMAGES and n * per_image <= CACHE_MAX_BYTES
        self.cached = bool(cache)
        threads = num_threads or min(8, os.cpu_count() or 1)
        keep, skipped, self.arrays = _decode_all(files, self.image_size, self.channels, self.cached, threads)
        self.skipped = problems + skipped
        if not keep:
            first = skipped[0]
            err = DataError(
                f"data.path: none of the {n} image files in '{root}' could be read (e.g. '{first[0]}': "
                f"{first[1]}); check that they are valid images"
            )
            err.skipped = list(self.skipped)  # for `ddpm data check`
            raise err
        if self.skipped:
            warnings.warn(
                f"data.path: skipped {len(self.skipped)} of {n + len(problems)} image files in '{root}' that could "
                f"not be used (also in dataset.skipped):\n{skip_report(self.skipped)}",
                stacklevel=2,
            )
        self.files = [files[i] for i in keep]
        self.labels = torch.tensor([labels[i] for i in keep], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def largest_original(self) -> Optional[tuple[int, int]]:
        """``(width, height)`` of the largest file (most pixels, EXIF-rotated), before the resize to ``image_size``.

        Read from the file headers (a few threads) each time it is asked; None when none can be read.
        """
        def stored_size(path: str) -> Optional[tuple[int, int]]:
            try:
                with open_image(path) as img:
                    w, h = img.size
                    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)  # 90-degree turns
            except Exception:  # noqa: BLE001 - changed since the scan: it does not count
                return None

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            sizes = [s for s in pool.map(stored_size, self.files) if s is not None]
        return max(sizes, key=lambda s: s[0] * s[1], default=None)

    def get_uint8(self, index: int) -> np.ndarray:
        """Image ``index`` as uint8 ``(H, W, C)`` (after conversion, resize and crop)."""
        if self.arrays is not None:
            return self.arrays[index]
        path = self.files[index]
        arr, reason = _try_load(path, self.image_size, self.channels)
        if arr is None:
            raise DataError(f"data.path: '{path}' could not be read any more ({reason}); it changed after the scan")
        return arr

    def __getitem__(self, index: int):
        return from_uint8(self.get_uint8(index)), self.labels[index]

    def __repr__(self) -> str:
        return (f"ImageFolderDataset('{self.root}', {len(self)} images, shape {self.sample_shape}, "
                f"classes {self.class_names}, skipped {len(self.skipped)})")


def to_uint8(x: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Images in [-1, 1], ``(B,C,H,W)`` (or one ``(C,H,W)``) -> uint8 ``(B,H,W,C)`` (or ``(H,W,C)``).

    Clamped to [-1, 1] (NaN -> 0, i.e. mid-grey), then ``round((x + 1) * 127.5)``.
    """
    t = torch.as_tensor(x).detach().to("cpu", torch.float32)
    if t.ndim not in (3, 4):
        raise ValueError(f"to_uint8 expects (C,H,W) or (B,C,H,W), got shape {tuple(t.shape)}")
    t = torch.nan_to_num(t, nan=0.0).clamp(-1.0, 1.0)
    t = ((t + 1.0) * 127.5).round().to(torch.uint8)
    return t.movedim(-3, -1).contiguous().numpy()


def from_uint8(arr: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
    """uint8 ``(H,W)``, ``(H,W,C)`` or ``(B,H,W,C)`` -> float32 ``(C,H,W)`` / ``(B,C,H,W)`` in [-1, 1].

    The exact inverse of :func:`to_uint8` on 8-bit values.
    """
    if isinstance(arr, torch.Tensor):
        t = arr.detach().to("cpu", torch.float32)
    else:
        t = torch.from_numpy(np.array(arr, dtype=np.float32))
    if t.ndim == 2:
        t = t[:, :, None]
    if t.ndim not in (3, 4):
        raise ValueError(f"from_uint8 expects (H,W), (H,W,C) or (B,H,W,C), got shape {tuple(t.shape)}")
    return t.movedim(-1, -3).div(127.5).sub(1.0).contiguous()
