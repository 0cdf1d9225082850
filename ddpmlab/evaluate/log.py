"""The evaluation log of a run: RUN/eval.csv, one row per evaluation during training."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Dict

import torch

from ddpmlab.atomic import atomic_write_text

EVAL_LOG = "eval.csv"


def append_eval_row(run_dir, step: int, values: Dict[str, float]) -> None:
    """Append one evaluation (metric name -> value) at ``step``; the header comes with the first row."""
    path = Path(run_dir) / EVAL_LOG
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["step", *values])
        w.writerow([step, *(f"{v:.6g}" for v in values.values())])


def write_rows(path: Path, rows: list) -> None:
    """Write a CSV log whole (a kill mid-write keeps the old one)."""
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    atomic_write_text(path, text.getvalue())


def trim_rows(path: Path, step: int) -> None:
    """Drop the rows of a run's CSV log (log.csv, eval.csv) after training step ``step``: a resumed run writes
    them again (torn rows go too); at step 0 the log goes, and a fresh one starts."""
    if not path.exists():
        return
    if step == 0:
        path.unlink()
        return
    rows = list(csv.reader(path.open()))
    write_rows(path, rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= step])


def trim_eval_log(run_dir, step: int) -> None:
    """Drop eval.csv's rows after ``step`` (a resumed run repeats them); a fresh run starts a new file."""
    trim_rows(Path(run_dir) / EVAL_LOG, step)


def read_eval_log(run_dir) -> Dict[str, torch.Tensor]:
    """eval.csv of a run as {column: tensor}; empty when the run never evaluated."""
    path = Path(run_dir) / EVAL_LOG
    if not path.exists():
        return {}
    rows = []
    for r in csv.DictReader(path.open()):
        try:  # a row torn by a kill mid-write is skipped
            rows.append({k: float(v) for k, v in r.items()})
        except (TypeError, ValueError):
            continue
    return {k: torch.tensor([r[k] for r in rows]) for k in (rows[0] if rows else {})}
