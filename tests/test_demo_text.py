"""The demo's Sample tab on a text-to-image run: the prompt box, the negative prompt and the guidance slider reach
the sampler as `ddpm sample --prompt` and the run layer pass them (same seed, same pixels), different prompts draw
different images; other runs keep their fields; bad input is one line."""

import json

import numpy as np
import pytest
import torch
from _util import perturb
from PIL import Image

from ddpmlab.cli import main
from ddpmlab.demo import Limits, Runs
from ddpmlab.demo import actions as act
from ddpmlab.errors import DDPMError, OptionError
from ddpmlab.runs import SamplingRequest, draw_samples, plan_request, resolve_device

pytest.importorskip("tokenizers")

TEXT = ["--config", "shapes_text", "data.image_size=[8,8]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
        "unet.attention_resolutions=[4]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=16",
        "text.width=16", "text.depth=1", "text.heads=2", "text.max_length=12", "text.caption_dropout=0.3",
        "train.minutes=null", "train.steps=2", "train.batch_size=4", "train.sample_n=4", "train.sample_steps=2",
        "train.mixed_precision=no", "--no-progress"]
PLAIN = ["--config", "mnist", "data.dataset=digits", "model.num_classes=null", "train.steps=2", "train.batch_size=8",
         "unet.base_channels=8", "unet.norm_groups=4", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]",
         "train.sample_n=4", "train.sample_steps=2", "--no-progress"]
COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "white": (240, 240, 240)}
ASK = dict(sampler="flow_euler", steps=3, seed=2, n=3)  # the tab's fields

pytestmark = pytest.mark.usefixtures("one_thread")


def _captioned_folder(root):
    """8 pictures of 8x8, a square or a bar of one colour, captioned in metadata.jsonl."""
    root.mkdir()
    lines = []
    for i, (colour, rgb) in enumerate(list(COLOURS.items()) * 2):
        shape = "square" if i < 4 else "bar"
        img = np.zeros((8, 8, 3), np.uint8)
        if shape == "square":
            img[2:6, 2:6] = rgb
        else:
            img[:, 3:5] = rgb
        Image.fromarray(img).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a {colour} {shape}", f"{shape} in {colour}"]}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo_text")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        folder = _captioned_folder(root / "pictures")
        assert main(["train", *TEXT, f"data.path={folder}", f"train.out_dir={root}", "train.name=text"]) == 0
        assert main(["train", *PLAIN, f"train.out_dir={root}", "train.name=plain"]) == 0
    finally:
        torch.set_num_threads(n)
    return root


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def test_the_prompt_boxes_sample_what_ddpm_sample_writes_for_those_prompts(runs_root, tmp_path):
    runs = Runs([runs_root / "text"], resolve_device("cpu"), tmp_path / "page")
    run_dir = str(runs_root / "text")
    res = act.sample(runs, run_dir, **ASK, prompt="a red square\n\nbar in blue", negative_prompt=" a green bar ",
                     guidance=4.0)
    assert main(["sample", run_dir, "--sampler", "flow_euler", "--steps", "3", "--seed", "2", "--n", "3",
                 "--prompt", "a red square", "--prompt", "bar in blue", "--negative-prompt", "a green bar",
                 "--guidance", "4", "--out", f"{tmp_path / 'cli'}/", "--npz", "--no-progress"]) == 0
    x = np.load(res.npz)["samples"]
    assert x.shape == (6, 3, 8, 8) and np.array_equal(x, np.load(tmp_path / "cli" / "samples.npz")["samples"])
    assert np.array_equal(_png(res.picture), _png(tmp_path / "cli" / "grid.png"))  # a row per prompt, as the CLI's
    assert len(res.files) == 6 and res.text.startswith("6 samples: flow_euler, 3 steps, guidance 4")
    assert "prompts: a red square; bar in blue; negative prompt: a green bar" in res.text
    own = act.sample(runs, run_dir, **ASK)  # an empty box: the run's own prompts, at the run's guidance
    assert "the run's own prompts" in own.text and ", guidance 2" in own.text


def test_the_prompt_reaches_the_sampler_different_prompts_draw_different_images(runs_root, tmp_path):
    runs = Runs([runs_root / "text"], resolve_device("cpu"), tmp_path / "page")
    run_dir = str(runs_root / "text")
    run = runs.get(run_dir)  # the page's loaded run: random weights everywhere, so the text matters
    perturb(run.model, seed=5, scale=0.2)
    red = act.sample(runs, run_dir, **ASK, prompt="a red square", guidance=3.0).x
    request = SamplingRequest("flow_euler", 3, guidance=3.0, seed=2, n=3, prompts=["a red square"])
    assert torch.equal(red, draw_samples(run, plan_request(run, request, log=lambda m: None), batch_size=256,
                                         progress=False))
    blue = act.sample(runs, run_dir, **ASK, prompt="bar in blue", guidance=3.0).x
    assert (red - blue).abs().max() > 0.05
    # the negative prompt and the slider reach the guidance: prompt = negative prompt is the conditional model
    cond = act.sample(runs, run_dir, **ASK, prompt="a red square", guidance=1.0).x
    same = act.sample(runs, run_dir, **ASK, prompt="a red square", negative_prompt="a red square", guidance=7.0).x
    assert torch.equal(same, cond) and not torch.allclose(red, cond, atol=1e-3)


def test_prompt_fields_show_for_a_text_run_only_and_bad_input_is_one_line(runs_root, tmp_path):
    runs = Runs([runs_root / "text", runs_root / "plain"], resolve_device("cpu"), tmp_path / "page")
    text, plain = str(runs_root / "text"), str(runs_root / "plain")
    placeholder, guidance = act.prompt_fields(runs, text)
    assert guidance == 2.0 and placeholder.splitlines() == runs.get(text).prompts[:4]  # shapes_text's guidance
    assert act.prompt_fields(runs, plain) is None
    assert "its own prompts: " in act.run_info(runs, text)[0]
    with pytest.raises(OptionError) as e:
        act.sample(runs, plain, steps=2, n=2, prompt="a cat")
    msg = str(e.value.named(act.NAMES))
    assert msg.startswith("prompt 'a cat': ") and "is not text-conditioned" in msg and "\n" not in msg
    with pytest.raises(OptionError) as e:
        act.sample(runs, text, steps=2, n=2, label="3")
    assert str(e.value.named(act.NAMES)).startswith("class 3: ") and "prompt" in str(e.value)
    with pytest.raises(DDPMError, match=r"n = 90 samples is more than this page serves \(at most 64"):
        act.sample(runs, text, steps=2, n=30, prompt="a\nb\nc", limits=Limits(64, 100))


def test_the_page_shows_the_prompt_fields_and_the_slider_guides_a_text_run(runs_root, tmp_path):
    gr = pytest.importorskip("gradio")
    from ddpmlab.demo.app import Handlers

    runs = Runs([runs_root / "text", runs_root / "plain"], resolve_device("cpu"), tmp_path / "page")
    h = Handlers(gr, runs, Limits())
    text, plain = str(runs_root / "text"), str(runs_root / "plain")
    *_, prompt, negative, slider = h.run(text, "ema")
    assert prompt["visible"] and negative["visible"] and slider["visible"] and slider["value"] == 2.0
    *_, prompt, negative, slider = h.run(plain, "ema")
    assert not (prompt["visible"] or negative["visible"] or slider["visible"])
    said, picture, _ = h.sample(text, "ema", "flow_euler", 3, None, 2, 3, None, None, "a red square", "", 5.0)
    res = act.sample(runs, text, **ASK, prompt="a red square", guidance=5.0)
    assert said.startswith("3 samples: flow_euler, 3 steps, guidance 5") and \
        np.array_equal(_png(picture), _png(res.picture))
