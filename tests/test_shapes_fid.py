"""The shapes set's classifier-FID: the shipped classifier loads from safetensors alone, FID on its features puts a
real set near another real set and far from noise, black images and colour-swapped images, its class logits are
the product of its attribute heads in the data's class order, and `ddpm eval` picks it for a shapes folder."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ddpmlab.cli import main
from ddpmlab.data import ImageFolderDataset
from ddpmlab.data.shapes import ATTRIBUTES, VALUES, ShapesSpec, generate
from ddpmlab.data.shapes_folder import SPEC_FILE, write_shapes_folder
from ddpmlab.errors import OptionError
from ddpmlab.evaluate.features import build_extractor, extract, shapes_extractor
from ddpmlab.evaluate.metrics import feature_sums, fid
from ddpmlab.evaluate.shapes_classifier import WEIGHTS, ShapesClassifier, load_shapes_classifier

SPEC = ShapesSpec()
WARM = [i for i in range(SPEC.num_classes) if SPEC.attributes(i)["colour"] in ("red", "yellow", "green")]
N = 200


def draw(classes, seed):
    return torch.from_numpy(generate(SPEC, classes, size=32, seed=seed)).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def extractor():
    return shapes_extractor()


def features(extractor, x):
    return extract(extractor, x.split(100), progress=False)[0]


def test_the_shipped_weights_load_with_safetensors_alone(monkeypatch):
    assert WEIGHTS.stat().st_size < 1_000_000
    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = f.metadata()
        stored = {k: f.get_tensor(k) for k in f.keys()}
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert set(stored) == set(ShapesClassifier(**json.loads(meta["config"])).state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("the classifier must not be unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    net = load_shapes_classifier()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    for k, v in net.state_dict().items():  # the stored numbers, exactly
        assert torch.equal(v, stored[k].to(v.dtype)), k
    assert json.loads(meta["accuracy"])["all"] >= 0.99  # what the training script measured on a held-out draw


def test_real_against_real_is_small_and_far_below_noise_black_and_colour_swapped(extractor):
    # the warm half of the palette: rotating the channels moves red, yellow, green to green, cyan, blue, a set of
    # other colours (on the whole palette a colour permutation leaves the set's distribution as it was)
    rng = np.random.default_rng(0)
    reference = feature_sums(features(extractor, draw(rng.choice(WARM, N), seed=1)))
    real = draw(rng.choice(WARM, N), seed=2)
    score = {"real": fid(reference, features(extractor, real)),
             "noise": fid(reference, features(extractor, torch.randn(real.shape, generator=torch.Generator()
                                                                     .manual_seed(0)).clamp(-1, 1))),
             "black": fid(reference, features(extractor, -torch.ones_like(real))),
             "colour_swapped": fid(reference, features(extractor, real[:, [2, 0, 1]]))}
    assert score["real"] < 20, score  # the bias of FID at n = 200 (at n = 2,000 it is 1.0)
    assert min(score["noise"], score["black"], score["colour_swapped"]) > 4 * score["real"], score


def test_class_logits_are_the_attribute_heads_product_in_the_given_class_order(extractor):
    names = ["small-red-plus-top", "large-blue-circle-centre", "large-yellow-triangle-bottom-right"]
    x = draw([SPEC.class_index(n) for n in names], seed=3)
    net = load_shapes_classifier()
    f = net.features(x)
    heads = net.attribute_logits(f)
    want = torch.stack([sum(heads[a].log_softmax(1)[:, VALUES[a].index(SPEC.attributes(SPEC.class_index(n))[a])]
                            for a in ATTRIBUTES) for n in names], 1)
    torch.testing.assert_close(net.set_classes(names).classify(f), want)
    everything = net.set_classes(None).classify(f)  # all 432 classes, in the set's class order
    torch.testing.assert_close(everything.exp().sum(1), torch.ones(3))
    assert everything.argmax(1).tolist() == [SPEC.class_index(n) for n in names]
    with pytest.raises(OptionError, match="'7' is not a shapes class name") as e:
        net.set_classes(["7"])
    assert e.value.option == "extractor"


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory):
    spec = ShapesSpec.of(sizes=["large"], colours=["blue", "red"], shapes=["circle", "square"],
                         positions=["centre", "left"])
    return write_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", n=300, size=32, spec=spec,
                               hold_out=True, progress=False)


def test_the_classifier_extractor_is_the_shapes_one_on_a_shapes_folder(shapes_folder, tmp_path):
    data = ImageFolderDataset(shapes_folder, (32, 32), 3)
    e = build_extractor("classifier", (3, 32, 32), data=data)
    assert e.name == "shapes" and e.identity.startswith("shapes-classifier-")
    x = torch.stack([data[i][0] for i in range(8)])
    logits = e.logits(x)  # in the folder's class order: its labels are the argmax
    assert logits.shape == (8, len(data.class_names))
    assert logits.argmax(1).tolist() == [int(data[i][1]) for i in range(8)]
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ("a", "b"):
        shutil.copytree(shapes_folder / data.class_names[0], plain / name)
    with pytest.raises(OptionError, match="inception") as e:  # no shapes.json: no shapes classifier
        build_extractor("classifier", (3, 32, 32), data=ImageFolderDataset(plain, (32, 32), 3))
    assert len(str(e.value).splitlines()) == 1
    with pytest.raises(OptionError, match="3x32x32"):
        build_extractor("shapes", (1, 28, 28))


TINY_32 = ["--config", "shapes_text", "unet.base_channels=8", "unet.channel_mults=[1,2]",
           "unet.attention_resolutions=[16]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=16",
           "text.width=16", "text.depth=1", "text.heads=2", "text.max_length=16", "text.caption_dropout=0.3",
           "train.minutes=null", "train.batch_size=4", "train.steps=2", "train.save_every=2", "train.sample_n=2",
           "train.sample_steps=2", "train.mixed_precision=no", "train.ema_start=0", "train.warmup_steps=1",
           "--no-progress"]


def test_ddpm_eval_fid_and_prompt_of_a_text_run_work_offline(shapes_folder, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY_32, f"data.path={shapes_folder}", f"train.out_dir={tmp_path}",
                     "train.name=tiny"]) == 0
        out = tmp_path / "eval.json"
        assert main(["eval", str(tmp_path / "tiny"), "--metrics", "fid,prompt", "--n", "130", "--steps", "1",
                     "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert result["extractor"]["name"] == "shapes"
    assert result["reference"]["n"] == 300 and (shapes_folder / SPEC_FILE).is_file()
    # an untrained model's samples are far from the folder; its own images (the baseline) are near the rest
    assert result["metrics"]["fid"] > 3 * result["data_baseline"]["fid"]
    assert "prompt_all_seen" in result["metrics"] and "prompt_all_held_out" in result["metrics"]
