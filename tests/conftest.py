"""Shared test fixtures."""

import pytest
import torch
from _util import STRAIGHT_STEPS, TINY_DIGITS


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread (intra-op threads thrash when other processes share the CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def straight_run(tmp_path_factory):
    """An uninterrupted 24-step run of `TINY_DIGITS`, trained once per session on one thread: the
    reference every resumed run is compared with. Read-only: a test that changes a run copies it
    first (``shutil.copytree(straight_run, tmp_path / "run")``)."""
    from ddpmlab.cli import main  # here, not at the top: a package that fails to import fails only its tests

    root = tmp_path_factory.mktemp("straight")
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the resumed runs, in this process (one_thread) or another (OMP_NUM_THREADS=1)
    try:
        assert main(["train", *TINY_DIGITS, f"train.steps={STRAIGHT_STEPS}", f"train.out_dir={root}",
                     "train.name=straight"]) == 0
    finally:
        torch.set_num_threads(n)
    return root / "straight"
