"""``ddpm data shapes OUT``, ``ddpm data shards SRC OUT`` and ``ddpm data spoken-digits OUT``: their options, and
what they do (write the data, say how to train on it)."""

from __future__ import annotations

import time

from ddpmlab.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, ShapesSpec, held_out_classes
from ddpmlab.data.shapes_folder import write_shapes_folder
from ddpmlab.data.shard_writer import write_shards
from ddpmlab.data.spoken_digits import (
    HELD_OUT,
    HELD_OUT_VARIANTS,
    TRAIN,
    TRAIN_VARIANTS,
    held_out_count,
    write_spoken_digits,
)


def _comma_list(text: str) -> list:
    """'red, blue' -> ['red', 'blue'] (ShapesSpec names an unknown value)."""
    return [v.strip() for v in text.split(",") if v.strip()]


def shapes_parser(dsub) -> None:
    """``ddpm data shapes`` under the ``ddpm data`` actions ``dsub``."""
    ds = dsub.add_parser(
        "shapes", help="write a folder of coloured shapes on black (a class per sub-folder, captions)",
        description="Write OUT, a new image folder of coloured shapes on a black background: one shape an image, "
                    "its size, colour, shape and grid position the class (a sub-folder per class, sorted names = "
                    "labels), metadata.jsonl with a caption per image, shapes.json with what made it. Same seed, "
                    "same folder. Score samples of a run trained on it with ddpmlab.evaluate.shapes.")
    ds.add_argument("out", metavar="OUT", help="new folder to write (must not exist)")
    ds.add_argument("--n", type=int, default=6000, help="number of images, every class equally often (default 6000)")
    ds.add_argument("--size", type=int, default=32, help="image side in pixels, at least 28 (default 32)")
    ds.add_argument("--seed", type=int, default=0, help="random seed of classes, jitter and captions (default 0)")
    for name, known in (("sizes", SIZES), ("colours", COLOURS), ("shapes", SHAPES), ("positions", POSITIONS)):
        ds.add_argument(f"--{name}", type=_comma_list, default=None, metavar="A,B,...",
                        help=f"only these {name} (default all: {','.join(known)})")
    ds.add_argument("--hold-out", action="store_true",
                    help="leave out one colour per shape (every size and position), for text-to-image held-out tests")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(func=cmd_data_shapes, parser=ds)


def cmd_data_shapes(args) -> int:
    spec = ShapesSpec.of(sizes=args.sizes, colours=args.colours, shapes=args.shapes, positions=args.positions)
    out = write_shapes_folder(args.out, n=args.n, size=args.size, seed=args.seed, spec=spec, hold_out=args.hold_out,
                              progress=not args.no_progress)
    classes = spec.num_classes - (len(held_out_classes(spec)) if args.hold_out else 0)
    print(f"wrote {out}: {args.n} images of {classes} classes, {args.size}x{args.size}; train on it with\n"
          f"  ddpm train data.dataset=folder data.path={out} data.image_size={args.size} model.num_classes={classes}\n"
          f"or from its captions (text-to-image) with\n  ddpm train --config shapes_text data.path={out} "
          f"data.image_size=[{args.size},{args.size}]")
    return 0


def shards_parser(dsub) -> None:
    """``ddpm data shards`` under the ``ddpm data`` actions ``dsub``."""
    ds = dsub.add_parser(
        "shards", help="write an image folder as WebDataset tar shards (data.dataset=webdataset streams them)",
        description="Write the images of SRC (class sub-folders: a .cls label each; metadata.jsonl or .txt captions: "
                    "a .txt member each) as WebDataset shards OUT/shard-000000.tar, ... of --per-shard samples, "
                    "shuffled once, and OUT/shards.json (sample counts, class names). The images keep their bytes. "
                    "Images without a caption (where SRC has captions) and files that do not decode are left out "
                    "and counted. Train on them with data.dataset=webdataset data.path=OUT.")
    ds.add_argument("src", metavar="SRC", help="image folder, as data.path of data.dataset=folder")
    ds.add_argument("out", metavar="OUT", help="new folder to write (must not exist)")
    ds.add_argument("--per-shard", type=int, default=1000, metavar="N",
                    help="samples per shard (default 1000; a run needs at least processes x loader workers shards)")
    ds.add_argument("--seed", type=int, default=0, help="seed of the one shuffle before sharding (default 0)")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(func=cmd_data_shards, parser=ds)


def cmd_data_shards(args) -> int:
    index = write_shards(args.src, args.out, per_shard=args.per_shard, seed=args.seed, progress=not args.no_progress)
    what = ", with captions" if index["captions"] else ""
    classes = len(index["class_names"])
    what += f", {classes} classes" if classes else ""
    text = " text.encoder=own" if index["captions"] else ""
    labels = f" model.num_classes={classes}" if classes else ""
    print(f"wrote {args.out}: {index['samples']} samples in {len(index['shards'])} shards{what}; train on them with\n"
          f"  ddpm train data.dataset=webdataset data.path={args.out}{labels}{text}")
    return 0


def spoken_digits_parser(dsub) -> None:
    """``ddpm data spoken-digits`` under the ``ddpm data`` actions ``dsub``."""
    ds = dsub.add_parser(
        "spoken-digits", help="write the ten spoken digits, synthesised offline with eSpeak NG (like SC09)",
        description="Write OUT, a new folder of one-second 16 kHz clips of the words zero to nine, synthesised with "
                    "eSpeak NG (pip package espeakng-loader) in many voices, speaking rates, pitches, levels and light "
                    "noise: OUT/train/<digit>/NNNNN.wav (train on it: data.dataset=audio data.path=OUT/train), "
                    "OUT/held_out/<digit>/NNNNN.wav spoken by voices the training clips never use (the reference of "
                    "ddpm eval), and OUT/spoken_digits.json with what made it. Same seed, same files.")
    ds.add_argument("out", metavar="OUT", help="new folder to write (must not exist)")
    ds.add_argument("--n-per-digit", type=int, default=300, metavar="N",
                    help="training clips of each digit (default 300); the held-out split has N / 5 (at least 10)")
    ds.add_argument("--seed", type=int, default=0, help="random seed of voices, prosody, levels and noise (default 0)")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(func=cmd_data_spoken_digits, parser=ds)


def cmd_data_spoken_digits(args) -> int:
    t0 = time.time()
    out = write_spoken_digits(args.out, n_per_digit=args.n_per_digit, seed=args.seed, progress=not args.no_progress)
    held = held_out_count(args.n_per_digit)
    print(f"wrote {out} in {time.time() - t0:.0f} s: {10 * args.n_per_digit} training clips in {out / TRAIN} "
          f"({len(TRAIN_VARIANTS)} voice variants) and {10 * held} held-out clips in {out / HELD_OUT} ("
          f"{len(HELD_OUT_VARIANTS)} other variants) of the ten digits, 1 s at 16 kHz; train on it with\n"
          f"  ddpm train --config spoken_digits data.path={out / TRAIN}")
    return 0
