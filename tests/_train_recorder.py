"""`ddpm` as a script that also records, per process, what the test of multi-process training checks.

Run as ``python tests/_train_recorder.py train ...`` under ``torchrun``, or call :func:`record` in
the test's own process before ``ddpm train``.  Besides what `ddpm train` does, every process writes
into the run directory the example indices of each step it trained on (``rank<R>_batches.json``)
and its own weights at each checkpoint (``rank<R>_step<S>.safetensors``): only rank 0 saves
checkpoints, so this shows the others.
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

import ddpmlab.training.data as data_module
import ddpmlab.training.loop as loop_module
from ddpmlab.cli import main


def record(setattr, rank: int) -> None:
    """Make the trainer record its batches and weights, patching through ``setattr`` (the builtin in
    a script, pytest's ``monkeypatch.setattr`` in a test, which undoes it afterwards)."""
    seen: list = []
    save = loop_module.save_state

    class RecordingSampler(data_module.StepBatchSampler):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(batch)
                yield batch

    def recording_save(s, step):
        trainee, run_dir = s.task.trainee, s.ctx.run_dir
        weights = {f"model.{k}": v for k, v in trainee.raw.state_dict().items()}
        weights.update({f"ema.{k}": v for k, v in trainee.ema.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()},
                  str(Path(run_dir) / f"rank{rank}_step{step}.safetensors"))
        (Path(run_dir) / f"rank{rank}_batches.json").write_text(json.dumps(seen))
        return save(s, step)

    setattr(data_module, "StepBatchSampler", RecordingSampler)
    setattr(loop_module, "save_state", recording_save)


if __name__ == "__main__":
    record(setattr, int(os.environ.get("RANK", "0")))
    sys.exit(main(sys.argv[1:]))
