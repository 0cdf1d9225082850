"""Captioned image folders: metadata.jsonl and .txt captions, several captions an image drawn per training step,
the rules of bad input, `ddpm data check`'s caption lines, the run's own tokenizer, the text config section."""

import json
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.config import Config, config_from_dict, validate
from ddpmlab.data import build_dataset
from ddpmlab.data.captions import (
    CaptionedDataset,
    CaptionedImageFolder,
    distinct_captions,
    draw_captions,
    drop_captions,
    drop_words,
    folder_captions,
)
from ddpmlab.data.check import check_folder
from ddpmlab.data.shapes import ShapesSpec
from ddpmlab.data.shapes_folder import write_shapes_folder
from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.errors import ConfigError, DataError


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _metadata(folder: Path, rows) -> None:
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


@pytest.fixture
def folder(tmp_path):
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _image(tmp_path / name, 40 * i)
    return tmp_path


def test_metadata_jsonl_gives_each_image_its_captions_strings_lists_and_repeated_lines(folder):
    _metadata(folder, [{"file_name": "a.png", "text": "a red circle"},
                       {"file_name": "b.png", "text": ["one", "two"]},
                       {"file_name": "c.png", "text": ""},
                       {"file_name": "b.png", "text": "three"},
                       {"file_name": "gone.png", "text": "no such image"}])
    ds = CaptionedImageFolder(folder, (8, 8))
    assert [Path(f).name for f in ds.files] == ["a.png", "b.png", "c.png"]
    assert ds.captions == [("a red circle",), ("one", "two", "three"), ("",)]  # empty: allowed
    assert ds.caption_source == "metadata.jsonl" and ds.unmatched == 1
    x, y, i = ds[1]
    assert x.shape == (3, 8, 8) and int(y) == 0 and i == 1
    assert torch.allclose(x, torch.full_like(x, 40 / 127.5 - 1))  # b.png's pixels, not another's


def test_txt_beside_each_image_one_caption_a_line_blank_file_is_the_empty_caption(folder):
    (folder / "a.txt").write_text("a red circle\r\n\n  a circle, red  \n")
    (folder / "b.txt").write_text("")
    (folder / "c.txt").write_bytes("café".encode("utf-8-sig"))  # a byte-order mark is dropped
    ds = CaptionedImageFolder(folder, (8, 8))
    assert ds.caption_source == ".txt"
    assert ds.captions == [("a red circle", "a circle, red"), ("",), ("café",)]


def test_an_image_without_a_caption_is_skipped_and_counted_in_one_warning(folder):
    _metadata(folder, [{"file_name": "a.png", "text": "x"}, {"file_name": "c.png", "text": []}])
    with pytest.warns(UserWarning) as caught:
        ds = CaptionedImageFolder(folder, (8, 8))
    (message,) = [str(w.message) for w in caught]
    assert "skipped 2 of 3 images" in message and "no caption" in message and "\n" not in message
    assert [Path(f).name for f in ds.uncaptioned] == ["b.png", "c.png"]
    assert len(ds) == 1 and ds.captions == [("x",)] and ds.arrays.shape[0] == 1
    assert torch.equal(ds[0][0], CaptionedImageFolder.__mro__[1](folder, (8, 8))[0][0])  # a.png kept


def test_a_folder_where_no_image_has_a_caption_is_one_line_error(folder):
    with pytest.raises(DataError, match=r"none of the 3 images .* has a caption; add metadata.jsonl") as e:
        CaptionedImageFolder(folder, (8, 8))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["metadata.jsonl", "a.txt"])
def test_non_utf8_caption_file_is_one_line_error_naming_file_and_line(folder, name):
    good = b'{"file_name": "a.png", "text": "ok"}\n' if name == "metadata.jsonl" else b"ok\n"
    (folder / name).write_bytes(good + "caf\u00e9".encode("latin-1") + b"\n")
    with pytest.raises(DataError) as e:
        CaptionedImageFolder(folder, (8, 8))
    msg = str(e.value)
    assert f"{folder / name}' line 2 is not UTF-8" in msg and "save the file as UTF-8" in msg and "\n" not in msg


@pytest.mark.parametrize("line, expected", [
    ("{not json", r"line 2 is not JSON"),
    ('{"text": "x"}', r'line 2 has no "file_name"'),
    ('{"file_name": "b.png", "caption": "x"}', r'line 2 has no "text" \(its keys: file_name, caption\)'),
    ('{"file_name": "b.png", "text": ["x", 3]}', r'"text" must be a caption or a list of captions'),
])
def test_a_bad_metadata_line_is_one_line_error_naming_the_line(folder, line, expected):
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError, match=expected):
        CaptionedImageFolder(folder, (8, 8))


def test_a_shapes_class_folder_is_captioned_data_with_its_labels(tmp_path):
    spec = ShapesSpec.of(sizes=["large"], colours=["red", "blue"], shapes=["circle"], positions=["centre", "top"])
    out = write_shapes_folder(tmp_path / "shapes", n=8, size=28, spec=spec, progress=False)
    ds = CaptionedImageFolder(out, (28, 28))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    want = {str(out / r["file_name"]): (r["text"],) for r in rows}
    assert len(ds) == 8 and ds.num_classes == 4
    assert [want[f] for f in ds.files] == ds.captions
    assert [ds.class_names[int(y)] for y in ds.labels] == [Path(f).parent.name for f in ds.files]


def test_build_dataset_reads_captions_when_text_encoder_is_set(folder):
    _metadata(folder, [{"file_name": n, "text": n} for n in ("a.png", "b.png", "c.png")])
    cfg = config_from_dict({"data": {"dataset": "folder", "path": str(folder), "image_size": 8}})
    assert type(build_dataset(cfg)).__name__ == "ImageFolderDataset"  # no text: the plain folder
    cfg.text.encoder = "own"
    ds = build_dataset(cfg)
    assert isinstance(ds, CaptionedImageFolder) and ds.captions == [("a.png",), ("b.png",), ("c.png",)]


def test_draw_captions_depends_on_seed_step_and_index_only_and_is_uniform():
    captions = [("only",), ("a", "b", "c")]
    one = draw_captions(captions, [1, 0], seed=3, step=7)
    assert one == draw_captions(captions, [1, 0], seed=3, step=7)  # a resume draws the same
    assert one[::-1] == draw_captions(captions, [0, 1], seed=3, step=7)  # whatever the batch's order
    assert draw_captions(captions, [0], 3, 7) == ["only"]
    counts = Counter(draw_captions(captions, [1], 0, s)[0] for s in range(3000))
    assert set(counts) == {"a", "b", "c"} and all(abs(c - 1000) < 100 for c in counts.values())  # 3 sigma ~ 77
    seeds = {draw_captions(captions, [1], seed, 5)[0] for seed in range(30)}
    assert len(seeds) == 3


def test_drop_captions_puts_the_empty_caption_where_u_is_below_p():
    assert drop_captions(["a", "b", "c"], 0.5, torch.tensor([0.1, 0.5, 0.9])) == ["", "b", "c"]
    assert drop_captions(["a"], 0.0, torch.tensor([0.0])) == ["a"]


def test_drop_words_leaves_out_a_share_p_of_words_in_order_from_seed_step_and_key_alone():
    texts = ["a small red square at the top left"] * 400
    keys = list(range(400))
    assert drop_words(texts, 0.0, 0, 1, keys) == texts
    out = drop_words(texts, 0.25, seed=0, step=1, keys=keys)
    assert out == drop_words(texts, 0.25, seed=0, step=1, keys=keys)  # a resume reads the same words
    assert out != drop_words(texts, 0.25, seed=0, step=2, keys=keys)
    assert out[::-1] == drop_words(texts[::-1], 0.25, 0, 1, keys[::-1])  # whatever the batch's order
    words = texts[0].split()
    for t in out:  # each one the caption with some words left out, none empty
        it = iter(words)
        assert t and all(w in it for w in t.split())
    kept = sum(len(t.split()) for t in out) / (400 * len(words))
    assert abs(kept - 0.75) < 0.03  # 3 sigma ~ 0.012
    assert drop_words(["red"] * 50, 0.9, 0, 1, range(50)) == ["red"] * 50  # never the empty caption


def test_captioned_dataset_wraps_latents_with_their_captions():
    base = torch.utils.data.TensorDataset(torch.arange(6.0).reshape(3, 2), torch.zeros(3, dtype=torch.long))
    ds = CaptionedDataset(base, [("a",), ("b",), ("c", "d")])
    x, y, i = ds[2]
    assert torch.equal(x, torch.tensor([4.0, 5.0])) and i == 2 and len(ds) == 3
    assert distinct_captions(ds.captions) == ["", "a", "b", "c", "d"]
    with pytest.raises(ValueError, match="2 caption tuples for 3 examples"):
        CaptionedDataset(base, [("a",), ("b",)])


def test_data_check_reports_captions_images_without_one_and_the_longest(folder):
    _metadata(folder, [{"file_name": "a.png", "text": ["A red circle, top-left.", ""]},
                       {"file_name": "b.png", "text": "blue"}])
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_folder(folder, (8, 8), 3, say=lines.append) == 0
    text = "\n".join(lines)
    assert "captions: 3 from metadata.jsonl for 2 of 3 images (1-2 an image)" in text
    assert "without a caption: 1 (skipped by text runs), e.g. c.png" in text
    assert "empty captions: 1" in text
    # a red circle , top - left . = 8 words and punctuation, plus [BOS] and [EOS]
    assert "longest caption: 10 tokens" in text and "'A red circle, top-left.'" in text
    assert "ignored" not in text  # metadata.jsonl is not an ignored file


def test_data_check_ignores_text_files_that_caption_no_image(folder):
    (folder / "a.txt").write_text("a caption")
    (folder / "notes.txt").write_text("not a caption")
    lines = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check_folder(folder, (8, 8), 3, say=lines.append) == 0
    text = "\n".join(lines)
    assert "captions: 1 from .txt for 1 of 3 images" in text and "ignored: 1 file(s)" in text and "notes.txt" in text
    (folder / "a.txt").unlink()
    assert folder_captions(folder, [str(folder / "a.png")]) == ([None], "", 0)  # notes.txt captions no image


def test_data_check_fails_on_an_unreadable_caption_file(folder):
    (folder / "a.txt").write_bytes(b"\xff\xfe")
    lines = []
    assert check_folder(folder, (8, 8), 3, say=lines.append) == 1
    assert any("line 1 is not UTF-8" in line for line in lines)


def test_tokenizer_round_trip_through_the_run_folder(tmp_path):
    captions = ["A large red Circle at the top-left", "a small blue square, bottom", "the red square"]
    tok = CaptionTokenizer.train(captions, max_length=12, vocab_size=100)
    ids, mask = tok(captions + [""])
    path = tok.save(tmp_path)
    assert path == tmp_path / "tokenizer.json"
    back = CaptionTokenizer.load(tmp_path, max_length=12)
    ids2, mask2 = back(captions + [""])
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2) and back.identity == tok.identity
    assert back.decode(ids[0]) == "a large red circle at the top - left"  # lower-cased words, in order
    assert ids[3, :2].tolist() == [tok.bos_id, tok.eos_id] and mask[3].sum() == 2  # the empty caption
    assert (ids[:, 0] == 1).all() and ids[0, mask[0].sum() - 1] == tok.eos_id  # [BOS] ... [EOS]
    assert tok([" RED  square "])[0].tolist() == tok(["red square"])[0].tolist()
    assert tok(["a purple square"])[0][0, 2] == tok.unk_id  # an unseen word


def test_tokenizer_vocabulary_keeps_the_most_frequent_words():
    tok = CaptionTokenizer.train(["red red red blue blue green"], max_length=8, vocab_size=6)
    assert tok.vocab_size == 6  # 4 special tokens + red + blue
    assert tok(["green"])[0][0, 1] == tok.unk_id and tok(["blue"])[0][0, 1] != tok.unk_id


def test_a_prompt_longer_than_max_length_is_truncated_with_one_warning_line():
    tok = CaptionTokenizer.train(["one two three four five six"], max_length=5)
    with pytest.warns(UserWarning, match=r"has 8 tokens but .* reads 5: truncated") as caught:
        ids, mask = tok(["one two three four five six"])
    assert "\n" not in str(caught[0].message)
    assert tok.decode(ids[0]) == "one two three" and ids[0, -1] == tok.eos_id and mask.all()


def test_text_config_section_is_validated_without_change():
    cfg = config_from_dict({"data": {"dataset": "folder", "path": "x"}, "text": {"encoder": "own", "width": 64,
                                                                                "heads": 4, "max_length": 16}})
    assert (cfg.text.encoder, cfg.text.width, cfg.text.max_length, cfg.text.caption_dropout) == ("own", 64, 16, 0.1)
    for bad, match in [({"text": {"caption_dropout": 1.0}}, "caption_dropout"),
                       ({"text": {"width": 30, "heads": 4}}, "text.heads=4 does not divide text.width=30"),
                       ({"text": {"max_length": 1}}, "text.max_length"),
                       ({"text": {"word_dropout": -0.1}}, "text.word_dropout"),
                       ({"data": {"dataset": "folder", "path": "x"}, "text": {"encoder": "clip", "word_dropout": 0.1}},
                        "set text.cache=false"),
                       ({"text": {"encoder": "own"}}, "data.dataset is 'mnist', which has no captions")]:
        with pytest.raises(ConfigError, match=match):
            config_from_dict(bad)
    before = Config()
    validate(before)
    assert before == Config()


def test_folder_captions_without_any_caption_file(folder):
    assert folder_captions(folder, [str(folder / "a.png")]) == ([None], "", 0)
