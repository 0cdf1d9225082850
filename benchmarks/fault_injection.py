"""Kill training at random moments and show that it always resumes to the uninterrupted run.

    python benchmarks/fault_injection.py                 # 20 seeds, ~3 min on 2 CPU cores
    python benchmarks/fault_injection.py --seeds 50 --kills 3

For each seed a tiny `ddpm train` run is killed with SIGKILL (no handler runs: as a power cut or the
OOM killer would) ``--kills`` times at random moments - during start-up, a training step, a log row, a
checkpoint save - and resumed each time with `ddpm train --resume`; then it trains to the end.  Every
seed must end with: a folder that loads (config, log, a loadable newest checkpoint), no checkpoint lost
(the newest one at each kill is still loadable after the resume), and final weights, EMA and optimiser
state equal bit for bit to a run that was never killed.  Prints one line per seed and the totals.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
STEPS = 40
TINY = ["--config", "mnist", "data.dataset=digits", "unet.base_channels=8", "unet.norm_groups=4",
        "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.batch_size=16", "train.minutes=null",
        "train.mixed_precision=no", "train.save_every=4", "train.log_every=1", "train.sample_n=2",
        "train.sample_steps=2", "train.device=cpu", "train.tensorboard=false", "--no-progress"]
PARTS = ("model", "ema", "optimizer")


def ddpm(*args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ddpmlab", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=600)


def newest_loadable(run: Path):
    sys.path.insert(0, str(REPO))
    from ddpmlab.io.checkpoint import find_checkpoint

    path, ckpt, _ = find_checkpoint(run)
    return None if ckpt is None else ckpt["step"]


def same_weights(a: Path, b: Path) -> bool:
    for part in PARTS:
        wa, wb = load_file(str(a / f"{part}.safetensors")), load_file(str(b / f"{part}.safetensors"))
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return True


def one_seed(seed: int, kills: int, straight: Path, root: Path, duration: float) -> str:
    rng = random.Random(seed)
    run = root / f"seed{seed}"
    args = [*TINY, f"train.steps={STEPS}", f"train.out_dir={root}", f"train.name=seed{seed}"]
    first = True
    for k in range(kills):
        cmd = ["train", *args] if first else ["train", "--resume", str(run), "--no-progress"]
        proc = subprocess.Popen([sys.executable, "-m", "ddpmlab", *cmd], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, env=ENV, cwd=root)
        time.sleep(rng.uniform(0.05, duration))
        before = newest_loadable(run) if run.exists() else None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = first and not (run / "config.yaml").exists()
        after = newest_loadable(run) if run.exists() else None
        if before is not None and (after is None or after < before):
            return f"LOST a checkpoint: step {before} before the kill, {after} after"
    final = ddpm("train", "--resume", str(run), "--no-progress", cwd=root) if not first else \
        ddpm("train", *args, cwd=root)
    if final.returncode != 0:
        return f"RESUME FAILED: {final.stderr.strip().splitlines()[-1] if final.stderr else final.returncode}"
    name = f"checkpoints/step_{STEPS:07d}"
    if not same_weights(straight / name, run / name):
        return "DIFFERS from the uninterrupted run"
    return "ok"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--kills", type=int, default=2, help="SIGKILLs per seed before it may finish")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ddpm-faults-"))
    try:
        t0 = time.time()
        r = ddpm("train", *TINY, f"train.steps={STEPS}", f"train.out_dir={root}", "train.name=straight", cwd=root)
        assert r.returncode == 0, r.stderr
        duration = time.time() - t0  # kills land anywhere in a run's life, start-up included
        results = {}
        for seed in range(args.seeds):
            results[seed] = one_seed(seed, args.kills, root / "straight", root, duration)
            print(f"seed {seed:3d}: {results[seed]}", flush=True)
        ok = sum(v == "ok" for v in results.values())
        print(f"{ok} of {args.seeds} seeds resumed bit-identically after {args.kills} SIGKILLs each "
              f"(a run takes {duration:.1f} s here; {time.time() - t0:.0f} s in all)")
        sys.exit(0 if ok == args.seeds else 1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
