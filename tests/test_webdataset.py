"""WebDataset shards streamed as training data (ddpmlab.data.shards, .stream, .shard_writer).

Each example is shown exactly once per epoch by 2 processes (simulated: rank and world given) with 2 loader
workers each; a run resumed at step k gets exactly the batches of a straight run; captions and labels round-trip
through `ddpm data shards` (the `webdataset` package reads its shards, and ddpmlab reads shards webdataset wrote);
bad members are skipped and counted in one warning line per shard; a tiny run on shards resumes bit for bit.
"""

import io
import json
import tarfile
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import Config
from ddpmlab.data import build_dataset, from_uint8, load_image
from ddpmlab.data.shards import INDEX_FILE, Rules, count_samples, expand_braces, shard_list
from ddpmlab.data.stream import ShardStream
from ddpmlab.errors import ConfigError, DataError
from ddpmlab.runs import load_autoencoder
from ddpmlab.training.data import latent_dataset, load_data, stream_loader


def _png(value: int, size: int = 8, channels: int = 3) -> bytes:
    """A flat image of ``value``: its pixels name the example."""
    buf = io.BytesIO()
    shape = (size, size, channels) if channels > 1 else (size, size)
    Image.fromarray(np.full(shape, value, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, samples) -> None:
    """A shard of ``samples``: (key, {suffix: bytes}) in order."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _shards(folder, sizes, bad=None) -> list:
    """Shards of the given sizes, example i a flat image of 5 * i captioned 'example i'; ``bad``: the
    example whose PNG is cut (its header reads, its pixels do not decode)."""
    folder.mkdir(parents=True, exist_ok=True)
    i = 0
    for s, n in enumerate(sizes):
        samples = []
        for _ in range(n):
            png = _png(5 * i)
            samples.append((f"{i:04d}", {"png": png[:-30] if i == bad else png, "txt": f"example {i}".encode()}))
            i += 1
        _tar(folder / f"s-{s:02d}.tar", samples)
    return sorted(str(p) for p in folder.glob("*.tar"))


def _number(text: str) -> int:
    return int(text.split()[-1])


def test_brace_patterns_expand_as_bash_does(tmp_path):
    assert expand_braces("a-{00..02}.tar") == ["a-00.tar", "a-01.tar", "a-02.tar"]
    assert expand_braces("{train,val}-{8..10}.tar") == ["train-8.tar", "train-9.tar", "train-10.tar",
                                                        "val-8.tar", "val-9.tar", "val-10.tar"]
    assert expand_braces("pipe:curl -s https://h/x-{000..001}.tar") == ["pipe:curl -s https://h/x-000.tar",
                                                                          "pipe:curl -s https://h/x-001.tar"]
    files = _shards(tmp_path / "d", [1, 1, 1])
    assert shard_list(str(tmp_path / "d")) == files == shard_list(str(tmp_path / "d" / "s-{00..02}.tar"))
    with pytest.raises(DataError, match=r"s-03.tar' does not exist"):
        shard_list(str(tmp_path / "d" / "s-{00..03}.tar"))


def _loader_batches(stream, rank, start, stop, world=2, workers=2, per_rank=3):
    """One simulated process's batches through the training loop's own DataLoader (2 workers)."""
    cfg = Config()
    cfg.data.num_workers, cfg.train.batch_size = workers, per_rank * world
    acc = SimpleNamespace(num_processes=world, process_index=rank, device=torch.device("cpu"))
    return list(stream_loader(stream, cfg, start, stop, acc))


def test_two_processes_with_two_workers_show_each_example_once_per_epoch(tmp_path):
    # 48 examples in 8 shards of 6: each of the 2 x 2 streams has 12 examples an epoch, 4 batches of 3,
    # so an epoch is 8 steps of the global batch 6
    _shards(tmp_path / "d", [6] * 8)
    stream = ShardStream(str(tmp_path / "d"), (8, 8), 3, captions=True)
    ranks = [_loader_batches(stream, r, 0, 16) for r in range(2)]
    steps = [(torch.cat([a[0], b[0]]), a[2] + b[2]) for a, b in zip(*ranks)]
    for x, texts in steps:  # each image is the one its caption names
        assert torch.equal(x, from_uint8(np.stack([np.full((8, 8, 3), 5 * _number(t), np.uint8) for t in texts])))
    epochs = [sorted(_number(t) for _, texts in steps[e * 8:(e + 1) * 8] for t in texts) for e in range(2)]
    assert epochs[0] == epochs[1] == list(range(48))
    assert [t for _, texts in steps[:8] for t in texts] != [t for _, texts in steps[8:] for t in texts]


def test_uneven_shards_still_share_each_epoch_out_exactly_once(tmp_path):
    files = _shards(tmp_path / "d", [3, 3, 3, 3, 3, 3, 2])
    stream = ShardStream(str(tmp_path / "d"), (8, 8), 3, captions=True, block=4)
    for epoch in range(3):
        parts = [stream.epoch_shards(epoch, r, 2, w, 2) for r in range(2) for w in range(2)]
        assert sorted(s for p in parts for s in p) == files
    for r in range(2):
        for w in range(2):
            entries = stream.entries(r, 2, w, 2)
            for epoch in range(3):
                mine = stream.epoch_shards(epoch, r, 2, w, 2)
                keys = [next(entries).key for _ in range(sum(stream.count(s) for s in mine))]
                want = sorted(f"{s.rsplit('/', 1)[1]}/{k}" for s in mine for k in _keys(s))
                assert sorted(keys) == want


def _keys(shard):
    with tarfile.open(shard) as tar:
        return sorted({m.name.split(".")[0] for m in tar.getmembers()})


def _equal(a, b) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]


@pytest.mark.parametrize("index", [False, True])
def test_a_run_resumed_at_step_k_continues_with_the_straight_runs_batches(tmp_path, index):
    # uneven shards, shuffle blocks of 4 that cross shards, and a cut image replaced in its block
    files = _shards(tmp_path / "d", [3, 3, 3, 3, 3, 3, 2], bad=7)
    if index:  # the counts from shards.json instead of reading the shards
        table = {f.rsplit("/", 1)[1]: {"samples": n} for f, n in zip(files, [3, 3, 3, 3, 3, 3, 2])}
        (tmp_path / "d" / INDEX_FILE).write_text(json.dumps({"shards": table, "captions": True}))
    stream = ShardStream(str(tmp_path / "d"), (8, 8), 3, captions=True, block=4)
    with pytest.warns(UserWarning, match=r"1 image\(s\) that do not decode, e.g. 's-02.tar/0007"):
        straight = {(r, k): b for r in range(2) for w in range(2)
                    for k, b in stream.step_batches(0, 24, 2, r, 2, 2).stream_batches(w)}
    assert "example 7" not in {t for b in straight.values() for t in b[2]}  # replaced, never shown
    for k in (1, 2, 7, 13, 22):
        for r in range(2):
            for w in range(2):
                for step, batch in stream.step_batches(k, 24, 2, r, 2, 2).stream_batches(w):
                    assert step >= k and _equal(batch, straight[(r, step)]), (k, r, step)
    for r in range(2):  # and through the loader's two workers, which start at step 7 in turn
        resumed = _loader_batches(stream, r, 7, 24, per_rank=2)
        assert len(resumed) == 17 and all(_equal(b, straight[(r, 7 + i)]) for i, b in enumerate(resumed))


def _captioned_folder(root):
    """Classes a, b; captions: lists, the empty caption, a line break; an uncaptioned and a broken image."""
    captions = {"a/0.png": ["a red thing", "a thing, red"], "a/1.png": [""], "b/2.png": ["two\nlines"],
                "b/3.png": ["blue"]}
    for i, name in enumerate(captions):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(_png(40 * i + 10))
    (root / "b" / "4.png").write_bytes(_png(200))  # no caption: left out
    (root / "b" / "5.png").write_bytes(b"not a picture")  # left out
    lines = [json.dumps({"file_name": n, "text": t}) for n, t in captions.items()]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n" + json.dumps({"file_name": "b/5.png", "text": "x"}))
    return {n: tuple(" ".join(c.split("\n")) for c in t) for n, t in captions.items()}


def test_captions_and_labels_round_trip_through_the_writer_and_webdataset(tmp_path, capsys):
    wds = pytest.importorskip("webdataset")
    expected = _captioned_folder(tmp_path / "src")
    with pytest.warns(UserWarning, match=r"left out 2 of 6 images.*1 without a caption.*1 that do not decode"):
        assert main(["data", "shards", str(tmp_path / "src"), str(tmp_path / "out"), "--per-shard", "3",
                     "--no-progress"]) == 0
    assert "data.dataset=webdataset" in capsys.readouterr().out
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert index["class_names"] == ["a", "b"] and [v["samples"] for v in index["shards"].values()] == [3, 1]
    by_bytes = {(tmp_path / "src" / n).read_bytes(): n for n in expected}
    seen = {}
    for sample in wds.WebDataset(str(tmp_path / "out" / "shard-{000000..000001}.tar"), shardshuffle=False):
        name = by_bytes[sample["png"]]  # the image's own bytes
        seen[name] = (tuple(sample["txt"].decode().split("\n")), int(sample["cls"]))
    assert seen == {n: (t if t != ("",) else ("",), int(n[0] == "b")) for n, t in expected.items()}
    stream = ShardStream(str(tmp_path / "out"), (8, 8), 3, captions=True, num_classes=2)
    assert stream.class_names == ["a", "b"] and len(stream) == 4
    assert sorted(stream.all_captions()) == sorted(expected.values())  # what a text run's tokenizer reads
    ours = {}
    for e in stream.entries():
        if len(ours) == 4:
            break
        name = next(n for n in expected if np.array_equal(e.pixels, load_image(str(tmp_path / "src" / n), (8, 8))))
        ours[name] = (e.captions, e.label)
    assert ours == {n: (t, int(n[0] == "b")) for n, t in expected.items()}


def test_shards_written_by_webdataset_are_read_alike(tmp_path):
    wds = pytest.importorskip("webdataset")
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "w-0.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"img{i}", "png": _png(i * 9), "txt": f"caption {i}\nother {i}", "cls": i % 3,
                        "json": {"width": 8}})  # other members are left alone
    entries = ShardStream(str(tmp_path / "d"), (8, 8), 3, captions=True, num_classes=3).entries()
    got = [next(entries) for _ in range(5)]
    assert sorted((e.key, e.captions, e.label, int(e.pixels[0, 0, 0])) for e in got) == \
        [(f"w-0.tar/img{i}", (f"caption {i}", f"other {i}"), i % 3, i * 9) for i in range(5)]


def test_bad_members_and_shards_are_skipped_and_counted_in_one_line_each(tmp_path):
    d = tmp_path / "d"
    d.mkdir()

    def good(i):
        return {"png": _png(i), "txt": f"ok {i}".encode(), "cls": b"1"}

    _tar(d / "a.tar", [("g1", good(1)), ("nopic", {**good(2), "png": b"<html>not found</html>"}),
                       ("nocap", {"png": _png(3), "cls": b"0"}),
                       ("latin", {**good(4), "txt": "café".encode("latin-1")}),
                       ("label9", {**good(5), "cls": b"9"}), ("txtonly", {"txt": b"a caption", "cls": b"0"}),
                       ("g2", good(6))])
    _tar(d / "b.tar", [(f"c{i}", good(10 + i)) for i in range(3)])
    with tarfile.open(d / "b.tar") as tar:
        cut = tar.getmember("c2.png").offset_data + 20  # into the 3rd sample's image
    (d / "b.tar").write_bytes((d / "b.tar").read_bytes()[:cut])
    (d / "c.tar").write_bytes(b"garbage, no tar")
    stream = ShardStream(str(d), (8, 8), 3, captions=True, num_classes=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        entries = stream.entries()
        keys = sorted(next(entries).key for _ in range(4))
    assert keys == ["a.tar/g1", "a.tar/g2", "b.tar/c0", "b.tar/c1"]
    lines = sorted(str(w.message) for w in caught)
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    assert lines[0].startswith("data.path: shard 'a.tar': skipped 5 of 7 samples (")
    for reason in ("1 without an image member, e.g. 'a.tar/txtonly'", "1 without a caption (.txt), e.g. 'a.tar/nocap'",
                   "1 with a caption that is not UTF-8", "1 without a label (.cls) in 0..1, e.g. 'a.tar/label9'",
                   "1 whose image is not a picture (UnidentifiedImageError), e.g. 'a.tar/nopic'"):
        assert reason in lines[0]
    assert "'b.tar': skipped 0 of 2 samples; it breaks off after 2 samples (ReadError" in lines[1]
    assert "'c.tar': skipped 0 of 0 samples; it breaks off after 0 samples" in lines[2]
    # counting (what a resumed run skips by) applies the same rules
    assert [count_samples(str(d / f), Rules(True, 2)) for f in ("a.tar", "b.tar", "c.tar")] == [2, 2, 0]


def _run_args(tmp_path, name, steps):
    return ["train", "--config", "mnist", "data.dataset=webdataset", f"data.path={tmp_path / 'shards'}",
            "data.image_size=8", "data.channels=1", "model.num_classes=null", "unet.base_channels=8",
            "unet.norm_groups=4", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.minutes=null",
            "train.batch_size=8", "train.save_every=2", "train.sample_n=2", "train.sample_steps=1",
            "train.ema_start=1", "train.warmup_steps=2", "data.num_workers=2", f"train.steps={steps}",
            f"train.out_dir={tmp_path}", f"train.name={name}", "--no-progress"]


def test_a_run_on_shards_resumes_bit_for_bit(tmp_path, one_thread):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(src / f"{i:02d}.png")
    assert main(["data", "shards", str(src), str(tmp_path / "shards"), "--per-shard", "8", "--no-progress"]) == 0
    assert main(_run_args(tmp_path, "straight", 6)) == 0
    assert main(_run_args(tmp_path, "stopped", 3)) == 0
    assert main(["train", "--resume", str(tmp_path / "stopped"), "train.steps=6", "--no-progress"]) == 0
    a, b = (load_file(tmp_path / r / "checkpoints/step_0000006/model.safetensors") for r in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_streams_refuse_what_needs_numbered_images_and_too_few_shards(tmp_path):
    _shards(tmp_path / "d", [2, 2, 2])
    cfg = Config()
    cfg.data.dataset, cfg.data.path, cfg.data.image_size, cfg.model.num_classes = "webdataset", str(tmp_path / "d"), \
        [8, 8], None
    assert isinstance(build_dataset(cfg), ShardStream)
    cfg.train.eval_every = 10
    with pytest.raises(ConfigError, match=r"train.eval_every=10: .* set train.eval_every=0"):
        load_data(cfg)
    cfg.train.eval_every, cfg.model.condition = 0, "low_res"
    with pytest.raises(ConfigError, match=r"model.condition=low_res: .*data.dataset=folder"):
        load_data(cfg)
    stream = build_dataset(cfg)
    with pytest.raises(DataError, match=r"3 shards cannot feed 2 processes x 2 loader workers.*at least 4 shards"):
        stream.step_batches(0, 4, 2, 0, 2, 2)


def test_a_pipe_source_streams_the_same_samples_as_the_files(tmp_path):
    _shards(tmp_path / "d", [2, 3])
    local = ShardStream(str(tmp_path / "d"), (8, 8), 3, captions=True)
    piped = ShardStream(f"pipe:cat {tmp_path / 'd'}/s-{{00..01}}.tar", (8, 8), 3, captions=True)
    assert len(piped) == len(local) == 5
    a, b = local.entries(), piped.entries()
    for _ in range(5):
        x, y = next(a), next(b)
        assert (x.key, x.captions) == (y.key, y.captions) and np.array_equal(x.pixels, y.pixels)


def test_a_latent_run_on_shards_encodes_each_batch_as_it_comes(tmp_path, one_thread):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=2,
                  norm_num_groups=4, scaling_factor=0.5).save_pretrained(tmp_path / "vae")
    (tmp_path / "src").mkdir()
    for i in range(16):
        Image.fromarray(np.full((8, 8), 15 * i, np.uint8)).save(tmp_path / "src" / f"{i:02d}.png")
    main(["data", "shards", str(tmp_path / "src"), str(tmp_path / "shards"), "--per-shard", "4", "--no-progress"])
    args = _run_args(tmp_path, "ldm", 2) + [f"model.autoencoder={tmp_path / 'vae'}", "data.num_workers=0"]
    assert main(args) == 0
    assert json.loads((tmp_path / "ldm" / "latents.json").read_text())["latent_shape"] == [2, 4, 4]
    cfg = Config()
    cfg.data.dataset, cfg.data.path, cfg.data.image_size, cfg.data.channels = "webdataset", str(tmp_path / "shards"), \
        [8, 8], 1
    cfg.model.autoencoder, cfg.model.num_classes, cfg.train.batch_size = str(tmp_path / "vae"), None, 4
    acc = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    pixels = load_data(cfg)
    latents, _ = latent_dataset(cfg, pixels, acc, main=False, progress=False)
    codec = load_autoencoder(str(tmp_path / "vae"), "cpu")
    for (x, _), (z, _) in zip(stream_loader(pixels, cfg, 0, 3, acc), stream_loader(latents, cfg, 0, 3, acc)):
        assert z.shape == (4, 2, 4, 4) and torch.equal(z, codec.encode(x))


def test_a_conditional_run_on_shards_without_labels_is_refused_at_the_start(tmp_path):
    _shards(tmp_path / "d", [2, 2])
    cfg = Config()
    cfg.data.dataset, cfg.data.path, cfg.data.image_size, cfg.model.num_classes = "webdataset", str(tmp_path / "d"), \
        [8, 8], 10
    with pytest.raises(DataError, match=r"^data.path: shard 's-00.tar': skipped 2 of 2 samples \(2 without a label "
                                        r"\(.cls\) in 0..9.*needs an image and a .cls label per sample$"):
        load_data(cfg)


def test_a_text_run_on_shards_reads_the_captions_its_batches_bring_and_resumes_bit_for_bit(tmp_path, one_thread):
    """A captioned folder as shards: the own encoder's tokenizer is built from every shard's captions, each step's
    captions come with the stream's batch, and a stopped run continues exactly."""
    src = tmp_path / "src"
    src.mkdir()
    rng, lines = np.random.default_rng(0), []
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"picture {i}", f"number {i} drawn"]}))
    (src / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["data", "shards", str(src), str(tmp_path / "shards"), "--per-shard", "4", "--no-progress"]) == 0
    args = ["train", "--config", "shapes_text", "data.dataset=webdataset", f"data.path={tmp_path / 'shards'}",
            "data.image_size=[8,8]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
            "unet.attention_resolutions=[4]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=16",
            "text.width=16", "text.depth=1", "text.heads=2", "text.max_length=8", "train.minutes=null",
            "train.batch_size=4", "train.save_every=2", "train.sample_n=2", "train.sample_steps=1",
            "train.mixed_precision=no", "train.ema_start=0", "train.warmup_steps=2", f"train.out_dir={tmp_path}",
            "--no-progress"]
    assert main([*args, "train.steps=4", "train.name=straight"]) == 0
    assert main([*args, "train.steps=2", "train.name=stopped"]) == 0
    assert main(["train", "--resume", str(tmp_path / "stopped"), "train.steps=4", "--no-progress"]) == 0
    a, b = (load_file(tmp_path / r / "checkpoints/step_0000004/model.safetensors") for r in ("straight", "stopped"))
    assert any(k.startswith("text_encoder.") for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    vocab = json.loads((tmp_path / "straight" / "tokenizer.json").read_text())["model"]["vocab"]
    assert {"picture", "number", "drawn", "7"} <= set(vocab)  # built from every shard's captions
