"""How the cost of pixel and latent diffusion grows with the image size: where latent diffusion pays.

At each of --sizes s (default 28, 56, 112; multiples of 4), untrained networks of the bundled recipes
on random data, one process, the same machine:

    pixel    the default `ddpm train` UNet (configs/mnist.yaml: base 32, levels 1, 2, 2, attention at
             the lowest level s/4) on s x s x 1 pixels
    latent   the bundled latent UNet (configs/mnist_latent.yaml: base 64, one level, attention) on the
             (s/4) x (s/4) x 4 latents of the bundled autoencoder (configs/mnist_autoencoder.yaml:
             AutoencoderKL, channels 32, 64, 64, f = 4), whose decoder every sample passes through once
             (and whose encoder every training image once, into the latent cache)

per size: FLOPs of one forward pass per image (torch's FlopCounterMode), training images/s (forward,
backward and AdamW at --batch, with the precision `train.mixed_precision=auto` picks; best of --rounds
interleaved rounds), and the cost of one sample at --nfe network evaluations (batch --batch), the
latent's decode included.  The ratios pixel / latent say how much more a pixel model costs per
training image and per sample; the 28x28 row is the digits' size, where
``benchmarks/latent_vs_pixel.py`` measures the quality each buys.

    python benchmarks/latent_crossover.py
    python benchmarks/latent_crossover.py --sizes 28,64,128 --batch 16 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from latent_vs_pixel import forward_flops
from quality_per_minute import cpu_name

from ddpmlab.config import load_config
from ddpmlab.models import build_model, count_parameters
from ddpmlab.models.autoencoder import build_autoencoder
from ddpmlab.training.precision import describe_precision, resolve_precision


def networks(s: int):
    """(pixel UNet, latent UNet, autoencoder) of the bundled recipes at image size s."""
    pixel = build_model(load_config("mnist", ["data.dataset=folder", "data.path=.", f"data.image_size={s}",
                                              "data.channels=1", "model.num_classes=null",
                                              f"unet.attention_resolutions=[{s // 4}]"]))
    latent = build_model(load_config("mnist_latent", ["model.autoencoder=null", "data.dataset=folder", "data.path=.",
                                                      "data.channels=4",
                                                      f"data.image_size={s // 4}",
                                                      f"unet.attention_resolutions=[{s // 4}]"]))
    a = load_config("mnist_autoencoder").autoencoder
    return pixel, latent, build_autoencoder(1, a.block_out_channels, a.latent_channels, a.layers_per_block,
                                            a.norm_groups)


def flops(fn) -> int:
    """FLOPs of ``fn()`` (torch's FlopCounterMode): the autoencoder's passes."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_rate(model, shape, batch: int, autocast) -> float:
    """Training images/s of one step (forward, L2 loss, backward, AdamW) after one warm-up step."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, t = torch.randn(batch, *shape), torch.randint(0, 1000, (batch,))

    def step():
        with autocast():
            loss = (model(x, t).float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    t0 = time.perf_counter()
    step()
    return batch / (time.perf_counter() - t0)


@torch.no_grad()
def sample_seconds(model, shape, batch: int, nfe: int, autocast, decode=None) -> float:
    """Seconds per sample: nfe forward passes at batch (and one decode of the batch)."""
    model.eval()
    x, t = torch.randn(batch, *shape), torch.full((batch,), 500)
    with autocast():
        model(x, t)  # warm-up
        t0 = time.perf_counter()
        for _ in range(nfe):
            model(x, t)
        if decode is not None:
            decode(x)
    model.train()
    return (time.perf_counter() - t0) / batch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="28,56,112", help="image sizes, multiples of 4 (default 28,56,112)")
    p.add_argument("--batch", type=int, default=32, help="batch of training steps and sampling (default 32)")
    p.add_argument("--nfe", type=int, default=20, help="network evaluations per sample (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best is reported (default 3)")
    p.add_argument("--out", default="runs/latent-crossover", help="output folder")
    args = p.parse_args(argv)
    sizes = [int(v) for v in args.sizes.split(",")]
    if any(s % 4 or s < 8 for s in sizes):
        raise SystemExit(f"--sizes {args.sizes}: each must be a multiple of 4 (the autoencoder's f), at least 8")
    precision, why = resolve_precision("auto", "cpu")
    autocast = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16"
                else contextlib.nullcontext)
    machine = f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, " \
              f"{describe_precision(precision)} ({why})"
    print(machine)
    rows, cpu = [], torch.device("cpu")
    for s in sizes:
        pixel, latent, codec = networks(s)
        lat = (4, s // 4, s // 4)
        row = {"size": s, "pixel_params": count_parameters(pixel), "latent_params": count_parameters(latent),
               "pixel_mflop": forward_flops(pixel, (1, s, s), cpu) / 1e6,
               "latent_mflop": forward_flops(latent, lat, cpu) / 1e6,
               "decode_mflop": flops(lambda: codec.decode(torch.randn(1, *lat))) / 1e6,
               "encode_mflop": flops(lambda: codec.posterior(torch.randn(1, 1, s, s))) / 1e6}
        best = {"pixel_train": 0.0, "latent_train": 0.0, "pixel_sample": 1e9, "latent_sample": 1e9}
        for _ in range(args.rounds):  # interleaved: a busy machine slows both alike
            best["pixel_train"] = max(best["pixel_train"], train_rate(pixel, (1, s, s), args.batch, autocast))
            best["latent_train"] = max(best["latent_train"], train_rate(latent, lat, args.batch, autocast))
            best["pixel_sample"] = min(best["pixel_sample"],
                                       sample_seconds(pixel, (1, s, s), args.batch, args.nfe, autocast))
            best["latent_sample"] = min(best["latent_sample"], sample_seconds(
                latent, lat, args.batch, args.nfe, autocast, decode=codec.decode))
        row.update(best)
        rows.append(row)
        print(f"{s}x{s}: train {best['pixel_train']:.0f} vs {best['latent_train']:.0f} img/s "
              f"({best['latent_train'] / best['pixel_train']:.1f}x), sample {best['pixel_sample'] * 1e3:.1f} vs "
              f"{best['latent_sample'] * 1e3:.1f} ms ({best['pixel_sample'] / best['latent_sample']:.1f}x)",
              flush=True)
    lines = [f"Machine: {machine}. Untrained networks, random data, batch {args.batch}; best of {args.rounds} "
             f"rounds; a sample = {args.nfe} network evaluations (+ one decode for latents).", "",
             "| image | pixel UNet MFLOP / img | latent UNet + decode MFLOP | train img/s pixel | latent | "
             "latent / pixel | ms per sample pixel | latent | pixel / latent |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['size']}x{r['size']} | {r['pixel_mflop']:.0f} | {r['latent_mflop']:.0f} + "
                     f"{r['decode_mflop']:.0f} | {r['pixel_train']:.0f} | {r['latent_train']:.0f} | "
                     f"{r['latent_train'] / r['pixel_train']:.1f}x | {r['pixel_sample'] * 1e3:.1f} | "
                     f"{r['latent_sample'] * 1e3:.1f} | {r['pixel_sample'] / r['latent_sample']:.1f}x |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latent_crossover.md").write_text(table + "\n")
    (out / "latent_crossover.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    print(f"wrote {out / 'latent_crossover.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
