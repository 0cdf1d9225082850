"""ddpmlab.training.allocator: after keep_freed_memory() freed tensor memory is reused without new page faults."""

import json
import subprocess
import sys

import pytest

from ddpmlab.training.allocator import _glibc

PROBE = """
import json, resource, torch
from ddpmlab.training.allocator import keep_freed_memory

def step():  # a training step's pattern: activations of several sizes, held together, then all freed
    held = [torch.ones(n) for n in (250_000, 1_250_000, 2_500_000, 5_000_000, 10_000_000, 2_500_000)]
    del held

def faults_per_step(n=4):
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / n

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

before = faults_per_step()
applied = keep_freed_memory()
faults_per_step(20)  # the heap grows to the step's peak (and its fragmentation settles) first
rss = rss_mb()
after = faults_per_step(10)
print(json.dumps({"before": before, "applied": applied, "again": keep_freed_memory(), "after": after,
                  "rss_growth_mb": rss_mb() - rss}))
"""


@pytest.mark.skipif(_glibc() is None, reason="the allocator is tuned only on glibc (Linux)")
def test_keep_freed_memory_stops_page_faults_on_reallocation(tmp_path):
    # a fresh process in an empty folder: nothing of the checkout's tree on its import path
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True,
                         cwd=tmp_path)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    pages = 4 * 21_500_000 / 4096  # the step's 86 MB of tensors
    assert r["before"] > 0.5 * pages  # default glibc: the large tensors' pages are faulted in at every step
    assert r["applied"] and r["again"]  # idempotent
    assert r["after"] < 0.01 * pages  # kept: freed blocks are reused, no new pages
    assert r["rss_growth_mb"] < 5  # and the heap does not grow from step to step


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_memory_unless_the_config_says_no(tmp_path, monkeypatch, keep):
    import ddpmlab.training.loop as loop
    import ddpmlab.training.tasks.diffusion as trainer
    from ddpmlab.config import load_config

    calls = []
    monkeypatch.setattr(loop, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config("toy2d", [f"train.out_dir={tmp_path}", "train.name=t", "train.steps=2", "train.sample_n=4",
                                "train.sample_steps=2", "train.device=cpu", f"train.keep_freed_memory={keep}",
                                "train.tensorboard=false"])
    trainer.train(cfg, progress=False)
    assert calls == ([1] if keep else [])
