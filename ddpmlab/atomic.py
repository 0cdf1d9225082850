"""Files written whole or not at all: a temporary file, fsynced, renamed into place (POSIX rename is atomic),
the folder fsynced.  A kill at any point leaves the previous file (or none) and, at worst, a temporary file
that the next write replaces - never half a file under the real name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from safetensors.torch import save_file


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _write_whole(path: Path, write: Callable[[Path], None]) -> Path:
    """``write`` the temporary file of ``path``, then publish it under ``path`` (the temporary never stays)."""
    tmp = _temporary(path)
    try:
        write(tmp)
        _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _write_whole(Path(path), lambda tmp: tmp.write_text(text))


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_whole(path, lambda tmp: tmp.write_bytes(data))


def atomic_save_tensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``tensors`` as a safetensors file at ``path`` atomically (parent folders made)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return _write_whole(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))
