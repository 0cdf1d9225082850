"""Tiny text runs for the adaptation tests (textual inversion, DreamBooth, LoRA for diffusers): captioned folders,
a random CLIP text encoder written by transformers, and the tiny shapes_text recipe."""

import json

import numpy as np
import torch
from PIL import Image

from ddpmlab.cli import main

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "white": (240, 240, 240)}
TINY_TEXT = ["--config", "shapes_text", "data.image_size=[8,8]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
             "unet.attention_resolutions=[4]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=16",
             "text.width=16", "text.depth=1", "text.heads=2", "text.max_length=12", "text.caption_dropout=0.3",
             "train.minutes=null", "train.batch_size=4", "train.save_every=2", "train.sample_n=4",
             "train.sample_steps=2", "train.log_every=1", "train.mixed_precision=no", "train.ema_start=0",
             "train.warmup_steps=2", "--no-progress"]


def shapes_folder(root, colours=("red", "blue", "green", "white"), shapes=("square", "bar"), captions=True):
    """8x8 pictures, one per (colour, shape): a square or a vertical bar, captioned "a red square" and
    "square in red" in metadata.jsonl (``captions``)."""
    root.mkdir(parents=True)
    lines = []
    for i, (colour, shape) in enumerate((c, s) for s in shapes for c in colours):
        img = np.zeros((8, 8, 3), np.uint8)
        if shape == "square":
            img[2:6, 2:6] = COLOURS[colour]
        else:
            img[:, 3:5] = COLOURS[colour]
        Image.fromarray(img).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a {colour} {shape}", f"{shape} in {colour}"]}))
    if captions:
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def clip_folder(root, words=("red", "blue", "green", "white", "square", "bar", "in", "photo", "of")):
    """A tiny random CLIPTextModel (16 wide) with a CLIP BPE tokenizer whose merges spell ``words``."""
    transformers = __import__("transformers")
    root.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = []
    for word in words:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    eos = "<|endoftext|>"
    vocab.update({"<|startoftext|>": len(vocab), eos: len(vocab) + 1})
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (root / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 16, "bos_token": "<|startoftext|>",
        "eos_token": eos, "pad_token": eos, "unk_token": eos}))
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=24,
                                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab[eos],
                                         pad_token_id=vocab[eos])
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(root)
    return root


def one_thread_main(args) -> int:
    """``ddpm ARGS`` on one thread (how the resumed runs compare bit for bit)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(n)


def train_text(data, root, name, steps, *more):
    assert one_thread_main(["train", *TINY_TEXT, f"data.path={data}", f"train.steps={steps}",
                            f"train.out_dir={root}", f"train.name={name}", *more]) == 0
    return root / name


def finetune(base, root, name, method, *more):
    """The arguments of ``ddpm finetune BASE --method METHOD`` into root/name."""
    return ["finetune", str(base), "--method", method, f"train.out_dir={root}", f"train.name={name}",
            "--no-progress", *more]
