"""Teach a trained text run a colour-shape pair it never saw: textual inversion and DreamBooth (with and without
prior preservation) on the bundled captioned shapes.

The base is a `shapes_text` run trained on `ddpm data shapes DIR --hold-out` (every shape misses one colour, at
all sizes and positions; benchmarks/text_shapes.py trains one). One held-out pair (--concept, default the first)
is the concept, learned from --images (at most 20) images of it at drawn sizes and positions, captioned in the
set's wordings with the pair's words (every wording: "red square", "red block", "square in red", ...) replaced by
the method's phrase, so that the words of size and position keep their meaning:

    textual-inversion   finetune.token=<concept>, its embedding starting from the shape's word (Gal et al. 2022)
    dreambooth+prior    finetune.token=sks finetune.class_word=SHAPE: "a large sks square at the top left", every
                        weight trained, --class-images drawn by the base for the class prompts (Ruiz et al. 2023)
    dreambooth          the same without prior preservation (finetune.class_images=0)

Scored with the exact shapes scorer (ddpmlab.evaluate.shapes), one sample a prompt, the runs' own sampler, steps
and guidance, the same seeds for every model:

    recall  --n prompts that use the concept ("a large <concept> at the top left": a class of the pair, a wording
            of the set, the method's phrase): the share of samples that show the concept's colour and shape
            ("concept"), and all four attributes right ("all"); the base is asked with the pair's own words
    keep    --keep-n prompts of the classes training saw (every one equally often): the share right in every
            attribute, the adapted model's beside the base's

It prints one table (also OUT/adapt_shapes.md, numbers in OUT/adapt_shapes.json) with each method's training
wall clock and what it trained, and the CPU.

    python benchmarks/adapt_shapes.py --run runs/text_shapes/run
    python benchmarks/adapt_shapes.py --run RUN --concept "yellow triangle" --steps 300 --class-images 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.text_shapes import cpu  # noqa: E402
from ddpmlab.data.concept import replace_phrases  # noqa: E402
from ddpmlab.data.shapes import SHAPE_WORDS, caption, captions, generate  # noqa: E402
from ddpmlab.evaluate.prompt import held_out_of, prompt_cases, shapes_folder_of  # noqa: E402
from ddpmlab.evaluate.shapes import score_shapes  # noqa: E402
from ddpmlab.runs import SamplingRequest, draw_samples, load_run, plan_request  # noqa: E402

TOKEN, IDENTIFIER = "<concept>", "sks"


def ddpm(*args: str) -> float:
    """Run ``ddpm ARGS``; its wall clock in seconds."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ddpmlab", *args], check=True)
    return time.perf_counter() - start


def concept_pair(spec, about, name):
    """(colour, shape, its classes) of the held-out pair ``name`` ('red square'; None: the first held out)."""
    held = held_out_of(spec, about)
    pairs = sorted({(spec.attributes(i)["colour"], spec.attributes(i)["shape"]) for i in held})
    if not pairs:
        raise SystemExit("the run's shapes folder holds every pair (written without --hold-out): no concept to learn")
    pair = tuple(name.split()) if name else pairs[0]
    if pair not in pairs:
        raise SystemExit(f"--concept '{name}' is not held out of the run's data; choose one of "
                         f"{', '.join(' '.join(p) for p in pairs)}")
    classes = [i for i in held if (spec.attributes(i)["colour"], spec.attributes(i)["shape"]) == pair]
    return pair[0], pair[1], np.asarray(classes)


def pair_phrases(colour: str, shape: str) -> list:
    """Every way the set's captions name the pair ("red square", "red square tile", "square in red", ...)."""
    return [f"{colour} {w}" for w in SHAPE_WORDS[shape]] + [f"{w} in {colour}" for w in SHAPE_WORDS[shape]]


def write_images(folder: Path, spec, classes, n: int, size: int, seed: int) -> Path:
    """n images of the concept's classes (sizes and positions drawn) with the set's captions, metadata.jsonl."""
    labels = np.random.default_rng([seed, 11]).choice(classes, size=n)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, text) in enumerate(zip(generate(spec, labels, size, seed + 1), captions(spec, labels, seed + 1))):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": text}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def concept_prompts(spec, classes, n: int, seed: int, phrases: list, phrase: str):
    """(classes (n,), prompts) asking for the concept by ``phrase`` in the set's wordings."""
    rng = np.random.default_rng([seed, 12])
    chosen = np.resize(rng.permutation(classes), n)
    texts = [caption(spec.attributes(int(c)), rng) for c in chosen]
    return chosen, [replace_phrases(t, phrases, phrase) for t in texts]


def shares(run_dir: Path, classes, prompts, spec, seed: int) -> dict:
    """Shares of samples (one a prompt) with the prompt's colour and shape, all four attributes, a clean
    background."""
    run = load_run(run_dir, device="cpu")
    plan = plan_request(run, SamplingRequest(prompts=list(prompts), n=1, seed=seed), log=lambda m: None)
    s = score_shapes(draw_samples(run, plan, progress=False), [int(c) for c in classes], spec)
    concept = (s["colour"] & s["shape"]).float().mean().item()
    return {"concept": concept, "all": s["all"].float().mean().item(), "clean": s["clean"].float().mean().item()}


def methods(args, colour: str, shape: str, few: Path) -> dict:
    """Each method's ddpm finetune arguments and the phrase its prompts name the concept by."""
    common = [f"data.path={few}", "finetune.replace=[" + ",".join(pair_phrases(colour, shape)) + "]",
              "train.minutes=null", f"train.steps={args.steps}", f"train.batch_size={args.batch_size}",
              f"train.save_every={args.steps}", "train.sample_every=0", "train.eval_every=0", "train.ema_start=0",
              "train.mixed_precision=no"]
    ti = ["--method", "textual-inversion", f"finetune.token={TOKEN}", f"finetune.init_token={shape}",
          f"train.lr={args.ti_lr}", "train.warmup_steps=0"]
    db = ["--method", "dreambooth", f"finetune.token={IDENTIFIER}", f"finetune.class_word={shape}",
          f"train.lr={args.db_lr}", f"finetune.prior_weight={args.prior_weight}"]
    return {
        "textual-inversion": (ti + common, TOKEN),
        "dreambooth+prior": (db + [f"finetune.class_images={args.class_images}"] + common, f"{IDENTIFIER} {shape}"),
        "dreambooth": (db + ["finetune.class_images=0"] + common, f"{IDENTIFIER} {shape}"),
    }


def trained(run_dir: Path) -> str:
    return next((line for line in (run_dir / "log.csv").read_text().splitlines()[-1:]), "")


def table(result: dict) -> str:
    base = result["base"]
    lines = ["| model | phrase | concept recall | all attributes | clean | seen prompts kept (all right) | "
             "training |", "|---|---|---|---|---|---|---|",
             f"| base | {result['concept']} | {100 * base['recall']['concept']:.1f} % | "
             f"{100 * base['recall']['all']:.1f} % | {100 * base['recall']['clean']:.1f} % | "
             f"{100 * base['keep']['all']:.1f} % | - |"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['phrase']} | {100 * m['recall']['concept']:.1f} % | {100 * m['recall']['all']:.1f} % "
                     f"| {100 * m['recall']['clean']:.1f} % | {100 * m['keep']['all']:.1f} % | {m['seconds']:.0f} s |")
    lines += ["", f"{result['images']} images of '{result['concept']}', {result['steps']} steps each; recall on "
              f"{result['n']} prompts, kept on {result['keep_n']}; {result['cpu']}"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a shapes_text run trained on `ddpm data shapes DIR --hold-out`")
    ap.add_argument("--concept", default=None, help="a held-out pair, e.g. 'red square' (default: the first)")
    ap.add_argument("--images", type=int, default=20, help="images of the concept (at most 20)")
    ap.add_argument("--steps", type=int, default=400, help="training steps of each method")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--ti-lr", type=float, default=5e-3, help="textual inversion's learning rate")
    ap.add_argument("--db-lr", type=float, default=2e-4, help="DreamBooth's learning rate")
    ap.add_argument("--class-images", type=int, default=200, help="DreamBooth's class images (prior preservation)")
    ap.add_argument("--prior-weight", type=float, default=1.0, help="DreamBooth's lambda")
    ap.add_argument("--n", type=int, default=128, help="prompts that use the concept")
    ap.add_argument("--keep-n", type=int, default=128, help="prompts of seen classes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/adapt_shapes")
    args = ap.parse_args()
    if not 1 <= args.images <= 20:
        ap.error("--images: 1 to 20 (the benchmark's few images)")
    out, base = Path(args.out), Path(args.run)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(base, device="cpu")
    spec, about = shapes_folder_of(run.cfg)
    colour, shape, classes = concept_pair(spec, about, args.concept)
    phrases = pair_phrases(colour, shape)
    few = write_images(out / "few", spec, classes, args.images, run.cfg.data.image_size[0], args.seed)
    seen = prompt_cases(spec, held_out_of(spec, about), args.keep_n * 2, args.seed)
    keep = (seen.classes[~seen.held_out][:args.keep_n], [p for p, h in zip(seen.prompts, seen.held_out) if not h][
        :args.keep_n])
    result = {"concept": f"{colour} {shape}", "images": args.images, "steps": args.steps, "n": args.n,
              "keep_n": len(keep[0]), "cpu": cpu(), "methods": {}}
    asked = concept_prompts(spec, classes, args.n, args.seed, phrases, f"{colour} {shape}")
    result["base"] = {"recall": shares(base, *asked, spec, args.seed), "keep": shares(base, *keep, spec, args.seed)}
    for name, (extra, phrase) in methods(args, colour, shape, few).items():
        folder = out / name.replace("+", "-")
        if not (folder / "log.csv").is_file():
            seconds = ddpm("finetune", str(base), *extra, f"train.out_dir={out}", f"train.name={folder.name}",
                           "--no-progress")
        else:
            seconds = float("nan")  # trained by an earlier call: scored again
        recall = shares(folder, *concept_prompts(spec, classes, args.n, args.seed, phrases, phrase), spec, args.seed)
        result["methods"][name] = {"phrase": phrase, "seconds": seconds, "recall": recall,
                                   "keep": shares(folder, *keep, spec, args.seed), "last_log_row": trained(folder)}
    (out / "adapt_shapes.json").write_text(json.dumps(result, indent=1) + "\n")
    text = table(result)
    (out / "adapt_shapes.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
