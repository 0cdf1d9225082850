"""Reference statistics of a dataset, computed once per (dataset content, extractor) and cached.

A cache entry ``<cache_dir>/reference/<key>.safetensors`` holds the FID sums over *all*
images of the dataset (float64 ``sum``, ``cov_sum``, ``n``) and the features of up to
``max_kept`` of them (a seeded random subset, with their dataset indices) for KID and
precision/recall.  ``key`` is a
hash of the dataset's content (its pixels, or for large image folders the file list with
sizes and times) and the extractor's identity (network and a hash of its weights), so a
changed dataset or extractor never reuses stale statistics.

The cache folder is ``--cache-dir``, else ``$DDPMLAB_CACHE``, else ``~/.cache/ddpmlab``.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddpmlab.atomic import atomic_save_tensors
from ddpmlab.evaluate.features import Extractor, extract
from ddpmlab.evaluate.metrics import feature_sums

CACHE_VERSION = "2"


def default_cache_dir() -> Path:
    if os.environ.get("DDPMLAB_CACHE"):
        return Path(os.environ["DDPMLAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddpmlab"


def dataset_fingerprint(dataset) -> str:
    """sha256 of a dataset's content: pixels when they are in memory, else files, sizes and times."""
    h = hashlib.sha256(f"{type(dataset).__name__}{tuple(dataset.sample_shape)}{len(dataset)}".encode())
    if getattr(dataset, "x", None) is not None:  # InMemoryDataset
        h.update(np.ascontiguousarray(dataset.x.detach().cpu().float().numpy()).tobytes())
    elif getattr(dataset, "arrays", None) is not None:  # image folder, decoded into memory
        h.update(np.ascontiguousarray(dataset.arrays).tobytes())
    elif getattr(dataset, "files", None) is not None:  # image folder too large to hold
        for f in dataset.files:
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    else:
        for i in range(len(dataset)):
            h.update(np.ascontiguousarray(dataset[i][0].float().numpy()).tobytes())
    return h.hexdigest()


@dataclass
class Reference:
    """FID sums over all ``n`` reference images, kept features (M, D) with their dataset indices (M,)."""

    sums: Dict[str, torch.Tensor]
    features: torch.Tensor
    index: torch.Tensor
    key: str
    path: Optional[Path]
    cached: bool  # True when read from the cache
    description: str

    @property
    def n(self) -> int:
        return int(self.sums["n"])

    def info(self) -> dict:
        return {"dataset": self.description, "n": self.n, "kept_features": len(self.features), "key": self.key,
                "cache_file": str(self.path) if self.path else None, "from_cache": self.cached}


def _dataset_batches(dataset, batch_size: int):
    if getattr(dataset, "x", None) is not None:
        for i in range(0, len(dataset), batch_size):
            yield dataset.x[i:i + batch_size]
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for batch in loader:  # (x, y), or a captioned folder's (x, y, index)
        yield batch[0]


def reference_key(fingerprint: str, extractor: Extractor, max_kept: int) -> str:
    text = json.dumps([CACHE_VERSION, fingerprint, extractor.identity, max_kept])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _load(path: Path) -> Optional[tuple]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        t = load_file(str(path))
        return {"sum": t["sum"], "cov_sum": t["cov_sum"], "n": t["n"]}, t["features"], t["index"], meta
    except Exception as e:  # damaged entry: recompute it
        warnings.warn(f"reference cache file {path} is unreadable ({type(e).__name__}); recomputing it")
        return None


def _save(path: Path, sums: dict, features: torch.Tensor, index: torch.Tensor, meta: dict) -> None:
    atomic_save_tensors({**sums, "features": features, "index": index}, path,  # a crash never leaves half an entry
                        metadata={k: str(v) for k, v in meta.items()})


def reference_statistics(dataset, extractor: Extractor, description: str, *, cache_dir: Union[str, Path, None] = None,
                         use_cache: bool = True, max_kept: int = 10000, batch_size: int = 256,
                         progress: bool = True) -> Reference:
    """FID sums of all of ``dataset`` and up to ``max_kept`` features, from the cache when possible."""
    key = reference_key(dataset_fingerprint(dataset), extractor, max_kept)
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "reference" / f"{key}.safetensors"
    if use_cache and path.is_file():
        hit = _load(path)
        if hit is not None:
            return Reference(hit[0], hit[1], hit[2], key, path, True, description)
    feats, _ = extract(extractor, _dataset_batches(dataset, batch_size), total=len(dataset), progress=progress,
                       desc="reference features")
    sums = feature_sums(feats)
    index = torch.arange(len(feats))
    if len(feats) > max_kept:
        index = torch.randperm(len(feats), generator=torch.Generator().manual_seed(0))[:max_kept].sort().values
    kept = feats[index]
    if use_cache:
        _save(path, sums, kept, index, {"dataset": description, "extractor": extractor.identity, "n": len(feats),
                                        "version": CACHE_VERSION})
    return Reference(sums, kept, index, key, path if use_cache else None, False, description)


def without(ref: Reference, index: torch.Tensor, features: torch.Tensor) -> Reference:
    """``ref`` minus the images ``index`` (whose features are ``features``): FID sums of the rest
    (exactly, by subtraction) and the kept features of the rest.  Scores n data images against
    the *other* images, so that the data baseline is held out, not compared with itself."""
    own = feature_sums(features)
    sums = {k: ref.sums[k] - own[k] for k in ("sum", "cov_sum", "n")}
    keep = ~torch.isin(ref.index, index)
    return Reference(sums, ref.features[keep], ref.index[keep], ref.key, ref.path, ref.cached,
                     f"{ref.description} without the {len(index)} baseline images")
