"""Kept for scripts written against the flat layout: the run-directory code is :mod:`ddpmlab.io.checkpoint`.

Nothing inside ddpmlab imports this module (tests/test_structure.py checks).
"""

from ddpmlab.io.checkpoint import (  # noqa: F401
                                   find_checkpoint,
                                   latest_checkpoint,
                                   list_checkpoints,
                                   load_model,
                                   load_run_config,
                                   load_weights,
                                   require_run_dir,
                                   save_checkpoint,
)
