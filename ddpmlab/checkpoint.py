"""Run-directory layout, atomic safetensors checkpoints and the resume state.

A run directory::

    RUN/
      config.yaml                 the resolved config of the run
      log.csv                     step, loss, lr, grad_norm, it/s
      samples/step_000500.png     sample grids (EMA weights)
      checkpoints/step_000500/    model.safetensors, ema.safetensors, optimizer.safetensors,
                                  state.json (step, ...)
      checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written into a temporary folder and renamed into place, so a crash
mid-save never damages the previous one.  Nothing is ever unpickled: weights and
optimizer tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from .config import Config, config_from_dict
from .errors import DDPMError

CONFIG_FILE = "config.yaml"
CKPT_DIR = "checkpoints"


def is_run_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def require_run_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DDPMError(f"run directory '{path}' does not exist; give the folder that `ddpm train` created (under runs/)")
    if not is_run_dir(path):
        raise DDPMError(
            f"'{path}' is not a ddpmlab run (no {CONFIG_FILE} inside); give the folder that `ddpm train` created"
        )
    return path


def load_run_config(run_dir) -> Config:
    import yaml

    run_dir = require_run_dir(run_dir)
    raw = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    return config_from_dict(raw, source=str(run_dir / CONFIG_FILE))


def _fsync_dir(path: Path) -> None:
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


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _contiguous(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def flatten_optimizer_state(opt_state: dict) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors (for safetensors) and JSON metadata."""
    tensors, meta_state = {}, {}
    for pid, st in opt_state["state"].items():
        meta_state[str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v
                meta_state[str(pid)][k] = {"tensor": f"{pid}.{k}"}
            else:
                meta_state[str(pid)][k] = v
    return _contiguous(tensors), {"state": meta_state, "param_groups": opt_state["param_groups"]}


def unflatten_optimizer_state(tensors: Dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {
            k: (tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v) for k, v in st.items()
        }
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, model_sd: dict, ema_sd: dict, opt_sd: dict,
                    extra: Optional[dict] = None, keep: int = 3) -> Path:
    """Atomically write checkpoint ``step`` and point ``latest`` at it; keep the newest ``keep``."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(_contiguous(model_sd), str(tmp / "model.safetensors"))
    save_file(_contiguous(ema_sd), str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = flatten_optimizer_state(opt_sd)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "optimizer": opt_meta, **(extra or {})}
    (tmp / "state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    atomic_write_text(root / "latest", name)
    old = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for p in old[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
    return final


def list_checkpoints(run_dir) -> list:
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_")), reverse=True)


def load_checkpoint(ckpt: Path) -> dict:
    """Read one checkpoint folder; raises on any missing or damaged file."""
    state = json.loads((ckpt / "state.json").read_text())
    opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
    return {
        "step": state["step"],
        "model": load_file(str(ckpt / "model.safetensors")),
        "ema": load_file(str(ckpt / "ema.safetensors")),
        "optimizer": unflatten_optimizer_state(opt_tensors, state["optimizer"]),
        "state": state,
    }


def latest_checkpoint(run_dir) -> Optional[Tuple[Path, dict]]:
    """The newest loadable checkpoint of a run, skipping (and reporting) damaged ones."""
    import warnings

    for ckpt in list_checkpoints(run_dir):
        try:
            return ckpt, load_checkpoint(ckpt)
        except Exception as e:  # damaged: fall back to the previous one
            warnings.warn(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {e}); trying an older one")
    return None


def load_weights(run_dir, which: str = "ema") -> Dict[str, torch.Tensor]:
    """Weights of a run's newest checkpoint: ``which`` is 'ema' or 'model'."""
    run_dir = require_run_dir(run_dir)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise DDPMError(f"run '{run_dir}' has no checkpoint yet; train it first (ddpm train --resume {run_dir})")
    return found[1][which]


def load_model(run_dir, which: str = "ema", device="cpu"):
    """(config, model in eval mode) of a trained run, with its ``which`` weights."""
    from .models import build_model

    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(load_weights(run_dir, which))
    return cfg, model.to(device).eval()
