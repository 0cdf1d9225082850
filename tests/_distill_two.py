"""Distillation under torchrun: ``python -m torch.distributed.run --nproc_per_node=2 tests/_distill_two.py RUN``.

Each process distills the exact mixture denoiser (tests/test_distill.py) into the same student and writes its own
final student weights to RUN/rank<R>.safetensors (only rank 0 writes checkpoints, so this shows the others)."""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file
from test_distill import SCHED, TEACHER, cfg_for, data, mlp

from ddpmlab.training.tasks.distill import distill

if __name__ == "__main__":
    run = Path(sys.argv[1])
    cfg = cfg_for(method="consistency", steps=1, iterations=[6], batch_size=32, n_start=4, n_end=8)
    student = mlp()
    distill(cfg, TEACHER, "eps", student, SCHED, data, run, progress=False, write_samples=False)
    rank = os.environ.get("RANK", "0")
    save_file({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()},
              str(run / f"rank{rank}.safetensors"))
