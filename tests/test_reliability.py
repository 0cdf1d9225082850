"""Reliability of training: kill/resume is exact, checkpoints survive real write failures,
NaN/inf steps never reach the weights, and one run directory has one writer."""

import itertools
import json
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _util import STRAIGHT_STEPS, TINY_DIGITS
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.diffusion.objectives import DiffusionObjective
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, save_checkpoint
from ddpmlab.training.guard import BadStepGuard, optimizer_step
from ddpmlab.training.lock import LOCK_FILE, RunLock
from ddpmlab.training.tasks.diffusion import train

REPO = Path(__file__).resolve().parents[1]
STEPS = STRAIGHT_STEPS
TINY = TINY_DIGITS
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _ddpm(*args, cwd, preexec_fn=None):
    return subprocess.run([sys.executable, "-m", "ddpmlab", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=300, preexec_fn=preexec_fn)


def _start(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "ddpmlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=cwd)


def _logged_step(run: Path) -> int:
    try:
        rows = (run / "log.csv").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [int(r.split(",")[0]) for r in rows[1:] if r.split(",")[0].isdigit()]
    return max(steps, default=0)


def _signal_at_step(proc, run: Path, step: int, sig) -> None:
    """Send ``sig`` once the run has logged ``step`` (the process is then at step or a little past)."""
    deadline = time.time() + 240
    while _logged_step(run) < step:
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()[-1500:]}"
        assert time.time() < deadline, "training too slow"
        time.sleep(0.002)
    proc.send_signal(sig)


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    for name in ("model", "ema", "optimizer"):
        wa, wb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k} differs from the uninterrupted run"
    sa, sb = json.loads((a / "state.json").read_text()), json.loads((b / "state.json").read_text())
    assert sa["optimizer"] == sb["optimizer"] and sa["step"] == sb["step"]


def _losses(run: Path) -> list:
    return [r.split(",")[:2] for r in (run / "log.csv").read_text().splitlines()[1:]]


@pytest.fixture
def straight(straight_run):
    """An uninterrupted 24-step run of TINY, the reference for every resumed one (shared, read-only)."""
    return straight_run


# ----------------------------------------------------------------------------- kill and resume

def test_sigkill_then_sigterm_at_random_steps_resumes_bit_identical(straight, tmp_path, capsys):
    rng = random.Random(20)  # seeded: a failure comes back with the same steps
    kill_at = rng.randint(2, 12)
    term_at = rng.randint(kill_at + 5, STEPS - 3)
    why = f"(SIGKILL after step {kill_at}, SIGTERM after step {term_at})"
    print(why)  # the random steps of this run, shown on failure
    run = tmp_path / "runs/r"
    # 1. SIGKILL: no handler runs; the lock and maybe a half-written checkpoint stay behind
    proc = _start("train", *TINY, f"train.steps={STEPS}", "train.name=r", cwd=tmp_path)
    _signal_at_step(proc, run, kill_at, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert (run / LOCK_FILE).exists() and not (run / "checkpoints/step_0000024").exists(), why
    # 2. resume: the stale lock is taken over; then SIGTERM asks for a clean checkpoint and exit 0
    proc = _start("train", "--resume", str(run), "--no-progress", cwd=tmp_path)
    _signal_at_step(proc, run, term_at, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert "taking over the stale lock" in out, out
    assert re.search(r"resuming .*(from step_\d{7}|no loadable checkpoint)", out), out
    saved = int(re.search(r"received SIGTERM: saved checkpoint at step (\d+)", out).group(1))
    assert term_at <= saved < STEPS, why + out
    assert load_checkpoint(run / f"checkpoints/step_{saved:07d}")["step"] == saved
    assert not (run / LOCK_FILE).exists()
    # 3. resume to the end (in this process): weights, EMA, optimizer state and the logged losses
    # equal the straight run
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert f"from step_{saved:07d}" in capsys.readouterr().out
    _assert_same_checkpoint(straight / "checkpoints/step_0000024", run / "checkpoints/step_0000024")
    assert _losses(straight) == _losses(run), why


# ----------------------------------------------------------------------------- write failures

def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_file_size_limit_during_save_keeps_previous_checkpoint(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = load_checkpoint(run / "checkpoints/step_0000024")
    # a real failing write: each file may hold 100 kB, the model weights need ~700 kB
    p = _ddpm("train", "--resume", str(run), "train.steps=28", "--no-progress", cwd=tmp_path,
              preexec_fn=_limit_file_size(100_000))
    assert p.returncode == 2, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()[-1]
    assert "could not write checkpoint step_0000028" in err and "File too large" in err, err
    assert "step_0000024 is intact" in err and "--resume" in err
    assert [c.name for c in list_checkpoints(run)][0] == "step_0000024"
    assert (run / "checkpoints/latest").read_text() == "step_0000024"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")], "temporary files left"
    after = load_checkpoint(run / "checkpoints/step_0000024")
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert not (run / LOCK_FILE).exists()


def _state(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g)}


@pytest.fixture
def tiny_disk(tmp_path):
    """A 600 kB tmpfs (needs root): a real full disk."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.decode().strip()}")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=False)  # lazy: loaded tensors may still map files


def test_full_disk_during_save_keeps_previous_checkpoint(tiny_disk):
    opt = {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(25_000)}},
           "param_groups": [{"lr": 1e-3, "params": [0]}]}
    save_checkpoint(tiny_disk, 1, _state(25_000, 1), _state(25_000, 2), opt)  # ~300 kB: fits
    with pytest.raises(CheckpointError, match="No space left on device") as e:
        save_checkpoint(tiny_disk, 2, _state(25_000, 3), _state(25_000, 4), opt)  # does not
    assert "step_0000001 is intact" in str(e.value) and "\n" not in str(e.value)
    assert [c.name for c in list_checkpoints(tiny_disk)] == ["step_0000001"]
    assert (tiny_disk / "checkpoints/latest").read_text() == "step_0000001"
    ckpt = load_checkpoint(tiny_disk / "checkpoints/step_0000001")
    assert torch.equal(ckpt["model"]["w"], _state(25_000, 1)["w"])
    assert torch.equal(ckpt["ema"]["w"], _state(25_000, 2)["w"])
    assert sorted(p.name for p in (tiny_disk / "checkpoints").iterdir()) == ["latest", "step_0000001"]


def test_keep_checkpoints_keeps_the_newest_k(tmp_path):
    opt = {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, _state(10, step), _state(10, step), opt, keep=2)
    assert [c.name for c in list_checkpoints(tmp_path)] == ["step_0000008", "step_0000006"]
    assert (tmp_path / "checkpoints/latest").read_text() == "step_0000008"


# ----------------------------------------------------------------------------- in-process tiny runs

def _tiny_cfg(root: Path, name: str, *extra):
    args = [a for a in TINY[2:] if a != "--no-progress"]
    return load_config("mnist_ddpm", args + [f"train.out_dir={root}", f"train.name={name}", *extra])


def test_resume_names_the_checkpoint_it_picked_and_the_damaged_ones(straight, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(straight, run)  # checkpoints at steps 16, 20 and 24
    (run / "checkpoints/step_0000024/ema.safetensors").write_bytes(b"half a file")
    (run / "checkpoints/step_0000020/state.json").write_text('{"step": 20, "optim')
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"skipping damaged checkpoint step_0000024 \(.*Error", out), out
    assert re.search(r"skipping damaged checkpoint step_0000020 \(.*Error", out), out
    assert "resuming" in out and "from step_0000016 (step 16), the newest loadable one (2 damaged skipped)" in out
    assert load_checkpoint(run / "checkpoints/step_0000024")["step"] == 24  # re-trained and re-saved


def _nan_at(monkeypatch, steps, kind="nan"):
    """Make the loss of the 0-based ``steps`` non-finite, by wrapping the objective the trainer calls.

    A fresh run without gradient accumulation calls its DiffusionObjective once per step (sampling
    and evaluation do not call it), so the n-th call is step n.
    """
    calls = itertools.count()
    objective = DiffusionObjective.__call__

    def corrupted(self, *args, **kwargs):
        loss = objective(self, *args, **kwargs)
        if next(calls) not in steps:
            return loss
        if kind == "grad":  # a finite loss whose gradient is inf: d sqrt(u)/du at u = 0
            return loss + torch.sqrt(loss - loss.detach())
        return loss * float(kind)

    monkeypatch.setattr(DiffusionObjective, "__call__", corrupted)


@pytest.mark.parametrize("kind", ["nan", "inf", "grad"])
def test_nonfinite_step_never_reaches_weights_or_ema(tmp_path, kind, capsys, monkeypatch):
    bad = {3, 5}  # 0-based steps: checkpoints step_3 -> step_4 and step_5 -> step_6 must not change
    cfg = _tiny_cfg(tmp_path, "r", "train.steps=7", "train.save_every=1", "train.keep_checkpoints=10")
    _nan_at(monkeypatch, bad, kind)
    run = train(cfg, progress=False)
    ck = {s: load_checkpoint(run / f"checkpoints/step_{s:07d}") for s in range(1, 8)}
    for s in range(2, 8):
        same = all(torch.equal(ck[s - 1][part][k], ck[s][part][k]) for part in ("model", "ema")
                   for k in ck[s][part])
        same_opt = all(torch.equal(ck[s - 1]["optimizer"]["state"][i][k], v)
                       for i, st in ck[s]["optimizer"]["state"].items() for k, v in st.items())
        assert same == same_opt == ((s - 1) in bad), f"step {s}: unchanged={same}, bad={(s - 1) in bad}"
    assert all(torch.isfinite(v).all() for v in ck[7]["model"].values())
    rows = (run / "log.csv").read_text().splitlines()
    skipped = {int(r.split(",")[0]): int(r.split(",")[-1]) for r in rows[1:]}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 1, 5: 0, 6: 1, 7: 0}
    out = capsys.readouterr().out
    assert "step 4: non-finite loss or gradient" in out and "2 steps skipped" in out


def test_too_many_bad_steps_in_a_row_stop_the_run_with_last_checkpoint_intact(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path, "r", "train.steps=20", "train.save_every=2", "train.max_bad_steps=3")
    _nan_at(monkeypatch, set(range(5, 20)))  # steps 6, 7, 8 are bad
    with pytest.raises(DDPMError, match=r"stopped at step 8: 3 steps in a row .* step_0000006 is intact") as e:
        train(cfg, progress=False)
    assert "--resume" in str(e.value) and "\n" not in str(e.value)
    run = tmp_path / "r"
    assert [c.name for c in list_checkpoints(run)] == ["step_0000006", "step_0000004", "step_0000002"]
    # step 6 was saved during the streak: it holds the weights of step 5, the last good step
    last = load_checkpoint(run / "checkpoints/step_0000006")
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert not (run / LOCK_FILE).exists()


def test_gradient_scaler_skips_bad_steps_and_recovers():
    """fp16 on a GPU: the scaler must see every step (also bad ones) to lower its scale and go on."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)  # what Accelerate builds for fp16 on CUDA
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    model, opt = acc.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
    guard, x = BadStepGuard(max_bad_steps=5, say=lambda m: None), torch.ones(2, 4)
    history = []
    for step, factor in enumerate([float("nan"), 1e34, 1.0, 1.0]):  # NaN loss, fp16-style overflow, good, good
        before = [p.detach().clone() for p in model.parameters()]
        loss = model(x).pow(2).mean() * factor
        acc.backward(loss)
        norm = acc.clip_grad_norm_(model.parameters(), float("inf"))
        changed = optimizer_step(acc, opt, guard.check(step, loss, norm, acc))
        opt.zero_grad()
        moved = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        history.append((changed, moved, acc.scaler.get_scale()))
    assert [(c, m) for c, m, _ in history] == [(False, False), (False, False), (True, True), (True, True)]
    assert [s for _, _, s in history] == [2.0 ** 15, 2.0 ** 14, 2.0 ** 14, 2.0 ** 14]
    assert guard.total == 2 and guard.in_a_row == 0


# ----------------------------------------------------------------------------- the run lock

def test_second_trainer_on_a_locked_run_refuses(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    with RunLock(run):  # this (live) process holds the run
        p = _ddpm("train", "--resume", str(run), "train.steps=30", "--no-progress", cwd=tmp_path)
        assert json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"is in use by another `ddpm train` (pid {os.getpid()} on host {socket.gethostname()}" in p.stderr
    assert not (run / LOCK_FILE).exists() and not (run / "checkpoints/step_0000028").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(run: Path, **record):
    run.mkdir(parents=True, exist_ok=True)
    (run / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "since": "then", **record}))


def test_stale_lock_of_a_dead_or_reused_pid_is_taken_over(tmp_path):
    notes = []
    for holder in ({"pid": _dead_pid()}, {"pid": os.getpid(), "started": "-1"}):  # gone; pid reused since
        _write_lock(tmp_path, **holder)
        with RunLock(tmp_path, say=notes.append):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert not (tmp_path / LOCK_FILE).exists()
    assert len(notes) == 2 and all("taking over the stale lock" in n and "process is gone" in n for n in notes)


def test_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
    _write_lock(tmp_path, pid=1, host="elsewhere")
    with pytest.raises(DDPMError, match=r"locked by pid 1 on host elsewhere .* delete .*\.lock"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["host"] == "elsewhere"


# ----------------------------------------------------------------------------- resume with another config

def test_resume_with_conflicting_config_needs_force(tmp_path, capsys):
    run = train(_tiny_cfg(tmp_path, "r", "train.steps=2", "train.save_every=2"), progress=False)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "train.lr=1e-4", "train.steps=3", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot change train.lr" in err and "add --force" in err
    assert main(["train", "--resume", str(run), "train.lr=1e-4", "train.steps=3", "--force", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "--force: train.lr changes from 0.001 to 0.0001" in out
    assert "lr: 0.0001" in (run / "config.yaml").read_text()  # the resolved config is stored
    lr = load_checkpoint(run / "checkpoints/step_0000003")["state"]["optimizer"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-4 * 3 / 5)  # the new lr, still in its 5-step warm-up
    # an architecture change cannot be forced: a clear error, not a state-dict traceback
    assert main(["train", "--resume", str(run), "unet.base_channels=8", "unet.norm_groups=4",
                 "train.steps=4", "--force", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "start a new run" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--force", "train.steps=1"]) == 2
    assert "--force only applies with --resume" in capsys.readouterr().err
