"""A bounded load test of `ddpm demo` on loopback: many clients, a quarter of their requests hostile.

    python benchmarks/demo_load.py                       # 200 requests from 8 clients, ~1-2 min on 2 CPU cores
    python benchmarks/demo_load.py --requests 400 --clients 16

Trains a tiny digit run, serves the page on 127.0.0.1 (a free port) and sends ``--requests`` Sample requests
from ``--clients`` threads through Gradio's client.  Every fourth request is hostile: steps far past
--max-steps, a negative or huge sample count, an unknown sampler, a RePaint-sized jump count.  Good requests
must all be answered with a picture, hostile ones refused with a message (never a hang or a crash), and the
server process's resident memory must stay bounded (the peak over the run is printed beside the start).
Talks to nothing but the loopback address and stops by itself.
"""

from __future__ import annotations

import argparse
import random
import resource
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ddpmlab.cli import main as ddpm
from ddpmlab.demo import serve
from ddpmlab.demo.app import DEFAULT_SCHEDULE, RUN_SAMPLER

TINY = ["--config", "mnist", "data.dataset=digits", "model.num_classes=null", "train.steps=4", "train.batch_size=8",
        "unet.base_channels=8", "unet.norm_groups=4", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]",
        "train.sample_n=4", "train.sample_steps=2", "train.minutes=null", "--no-progress"]
HOSTILE = [  # (sampler, steps, n): each must be refused in one message
    (RUN_SAMPLER, 10**7, 2), (RUN_SAMPLER, 2, -5), (RUN_SAMPLER, 2, 10**6), ("no_such_sampler", 2, 2),
    ("ddpm", 10**9, 1),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=8)
    args = p.parse_args()
    from gradio_client import Client

    root = Path(tempfile.mkdtemp(prefix="ddpm-load-"))
    assert ddpm(["train", *TINY, f"train.out_dir={root}", "train.name=img"]) == 0
    run, port = str(root / "img"), free_port()
    app = serve([run], port=port, device="cpu", out_root=root / "page", block=False, quiet=True)
    url = f"http://127.0.0.1:{port}"
    rng = random.Random(0)
    plan = [rng.choice(HOSTILE) if i % 4 == 3 else (RUN_SAMPLER, rng.randint(1, 4), rng.randint(1, 8))
            for i in range(args.requests)]
    local = threading.local()
    start_mb, peak = rss_mb(), [rss_mb()]

    def send(i: int) -> tuple:
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False)
        sampler, steps, n = plan[i]
        hostile = i % 4 == 3
        t0 = time.perf_counter()
        try:
            text, picture, _ = local.client.predict(run, "ema", sampler, steps, DEFAULT_SCHEDULE, i, n, None, None,
                                                    api_name="/sample")
            ok = not hostile and bool(picture) and Path(picture).is_file()
        except Exception as e:  # noqa: BLE001 - a refusal reaches the client as an error with its message
            ok = hostile and bool(str(e).strip())
        peak[0] = max(peak[0], rss_mb())
        return hostile, ok, time.perf_counter() - t0

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(send, range(args.requests)))
    finally:
        app.close()
    wall = time.perf_counter() - t0
    good = [r for r in results if not r[0]]
    bad = [r for r in results if r[0]]
    slowest = max(r[2] for r in results)
    print(f"{args.requests} requests from {args.clients} clients in {wall:.1f} s: {sum(r[1] for r in good)} of "
          f"{len(good)} good requests answered with a picture, {sum(r[1] for r in bad)} of {len(bad)} hostile ones "
          f"refused with a message; slowest {slowest:.1f} s; server memory {start_mb:.0f} MB at the start, "
          f"{peak[0]:.0f} MB at the peak")
    sys.exit(0 if all(r[1] for r in results) else 1)


if __name__ == "__main__":
    main()
