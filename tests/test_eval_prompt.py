"""The prompt-adherence metric (`ddpm eval RUN --metrics prompt`): the shapes folder's own images score right
on every attribute, colour-swapped ones wrong in colour alone, the seen and held-out cases are those of
shapes.json, and on a tiny text run the metric and a text run's FID prompts go through `ddpm eval`."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.data import build_dataset
from ddpmlab.data.shapes import COLOURS, SHAPE_WORDS, ShapesSpec, generate
from ddpmlab.data.shapes_folder import SPEC_FILE, read_shapes_spec, write_shapes_folder
from ddpmlab.errors import OptionError
from ddpmlab.evaluate.prompt import (
    eval_prompts,
    held_out_of,
    prompt_adherence,
    prompt_cases,
    prompt_metric,
    shapes_folder_of,
)
from ddpmlab.evaluate.run import EvalContext, EvalSettings
from ddpmlab.runs import load_run

# 8 classes; held out (one colour per shape): red circles and blue squares, at both positions
SPEC = ShapesSpec.of(sizes=["large"], colours=["blue", "red"], shapes=["circle", "square"],
                     positions=["centre", "left"])
HELD_OUT = {"large-red-circle-centre", "large-red-circle-left", "large-blue-square-centre", "large-blue-square-left"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_shapes_folder(tmp_path_factory.mktemp("data") / "shapes", n=8, size=28, spec=SPEC, hold_out=True,
                               progress=False)


def _true_images(folder, spec, classes):
    """Each class's image as the set draws it: a PNG of the folder where it has one, else drawn afresh
    (the held-out classes have no sub-folder)."""
    names, out = spec.class_names(), []
    for k, c in enumerate(classes):
        sub = folder / names[c]
        if sub.is_dir():
            arr = np.asarray(Image.open(sorted(sub.iterdir())[0]).convert("RGB"))
        else:
            arr = generate(spec, [c], size=28, seed=k)[0]
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 127.5 - 1)
    return torch.stack(out)


def test_the_cases_split_seen_and_held_out_as_shapes_json_says(folder):
    spec, about = read_shapes_spec(folder)
    assert set(about["held_out"]) == HELD_OUT and not about["held_out_in_folder"]
    cases = prompt_cases(spec, held_out_of(spec, about), n=8, seed=0)
    names = spec.class_names()
    assert sorted(cases.classes.tolist()) == list(range(8))  # every class once
    assert [names[c] in HELD_OUT for c in cases.classes] == cases.held_out.tolist()
    for c, prompt in zip(cases.classes, cases.prompts):  # the training wordings: every attribute named
        attrs = spec.attributes(int(c))
        assert attrs["colour"] in prompt and [w for w in COLOURS if w in prompt] == [attrs["colour"]]
        assert any(w in prompt for w in SHAPE_WORDS[attrs["shape"]])
    small = prompt_cases(spec, held_out_of(spec, about), n=4, seed=1)  # a balanced subset: 2 seen, 2 held out
    assert small.held_out.sum() == 2 and len(set(small.classes.tolist())) == 4
    assert prompt_cases(spec, held_out_of(spec, about), n=4, seed=1).prompts == small.prompts  # seeded
    both = prompt_cases(spec, held_out_of(spec, {**about, "held_out_in_folder": True}), n=8)
    assert not both.held_out.any()  # a folder that holds every class: all seen


def _stand_in(folder, spec, about, n, seed, swap=False):
    """A sampler that returns each asked-for class's true image (or the same with red and blue swapped)."""
    cases = prompt_cases(spec, held_out_of(spec, about), n, seed)

    def draw(prompts):
        assert prompts == cases.prompts
        x = _true_images(folder, spec, cases.classes)
        return x[:, [2, 1, 0]] if swap else x

    return draw


def test_the_folders_own_images_score_right_on_every_attribute(folder):
    spec, about = read_shapes_spec(folder)
    result = prompt_adherence(_stand_in(folder, spec, about, 16, 3), spec, about, 16, seed=3)
    assert result["prompt_n_seen"] == 8 and result["prompt_n_held_out"] == 8
    for score in ("clean", "size", "colour", "shape", "position", "all"):
        assert result[f"prompt_{score}_seen"] == 1.0 and result[f"prompt_{score}_held_out"] == 1.0


def test_swapped_colours_score_wrong_in_colour_alone(folder):
    spec, about = read_shapes_spec(folder)
    result = prompt_adherence(_stand_in(folder, spec, about, 8, 0, swap=True), spec, about, 8, seed=0)
    for group in ("seen", "held_out"):
        assert result[f"prompt_colour_{group}"] == 0.0 and result[f"prompt_all_{group}"] == 0.0
        assert result[f"prompt_shape_{group}"] == 1.0 and result[f"prompt_position_{group}"] == 1.0


def test_the_metric_refuses_a_folder_without_shapes_json_and_a_run_without_text(tmp_path):
    cfg = load_config("shapes_text", [f"data.path={tmp_path}"])
    with pytest.raises(OptionError, match=r"'.*shapes\.json'.* missing.*ddpm data shapes DIR --hold-out"):
        shapes_folder_of(cfg)
    ctx = SimpleNamespace(run=SimpleNamespace(is_text=False, dir="runs/mnist"), s=EvalSettings(), cfg=cfg)
    with pytest.raises(OptionError, match="runs/mnist takes no prompt"):
        prompt_metric(ctx)


def test_a_text_runs_samples_take_training_captions_or_the_prompts_asked_for():
    data = SimpleNamespace(captions=[("a red circle",), ("", "a blue square"), ("",)])
    drawn = eval_prompts(data, None, 50, seed=0)
    assert set(drawn) == {"a red circle", "a blue square"} and drawn == eval_prompts(data, None, 50, seed=0)
    assert eval_prompts(data, ["x", "y"], 5, seed=0) == ["x", "x", "x", "y", "y"]
    assert eval_prompts(SimpleNamespace(), None, 4, seed=0) is None  # streamed data: the run's own prompts


TINY_28 = ["--config", "shapes_text", "data.image_size=[28,28]", "unet.base_channels=8", "unet.channel_mults=[1,2]",
           "unet.attention_resolutions=[14]", "unet.norm_groups=4", "unet.context_dim=16", "unet.pooled_dim=16",
           "text.width=16", "text.depth=1", "text.heads=2", "text.max_length=16", "text.caption_dropout=0.3",
           "train.minutes=null", "train.batch_size=4", "train.steps=2", "train.save_every=2", "train.sample_n=2",
           "train.sample_steps=2", "train.mixed_precision=no", "train.ema_start=0", "train.warmup_steps=1",
           "--no-progress"]


@pytest.fixture(scope="module")
def text_run(folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY_28, f"data.path={folder}", f"train.out_dir={root}", "train.name=tiny"]) == 0
    finally:
        torch.set_num_threads(threads)
    return root / "tiny"


def test_ddpm_eval_prompt_reports_seen_and_held_out_shares(text_run, tmp_path, capsys):
    out = tmp_path / "prompt.json"
    assert main(["eval", str(text_run), "--metrics", "prompt", "--n", "8", "--steps", "2", "--no-progress",
                 "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["prompt_n_seen"] == 4 and metrics["prompt_n_held_out"] == 4
    assert {f"prompt_{k}_{g}" for k in ("clean", "size", "colour", "shape", "position", "all")
            for g in ("seen", "held_out")} <= set(metrics)
    assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if not k.startswith("prompt_n_"))
    assert "prompt_all_held_out" in capsys.readouterr().out  # the printed table


def test_ddpm_eval_of_a_text_run_samples_training_captions_or_the_prompt(text_run, folder, tmp_path, capsys):
    run = load_run(text_run, device="cpu")
    ctx = EvalContext(run.cfg, run.model, run.schedule, build_dataset(run.cfg), EvalSettings(n=6), run.device,
                      progress=False, run=run)
    captions = {json.loads(line)["text"] for line in (folder / "metadata.jsonl").read_text().splitlines()}
    assert len(ctx.plan.prompts) == 6 and set(ctx.plan.prompts) <= captions
    out = tmp_path / "clean.json"
    assert main(["eval", str(text_run), "--metrics", "clean", "--n", "2", "--steps", "2", "--prompt", "a red disc",
                 "--no-progress", "--no-baseline", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["settings"]["prompts"] == ["a red disc"]
    (folder / SPEC_FILE).rename(tmp_path / SPEC_FILE)
    try:
        capsys.readouterr()
        assert main(["eval", str(text_run), "--metrics", "prompt", "--n", "2", "--steps", "2", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--metrics" in err[0] and SPEC_FILE in err[0] and "--hold-out" in err[0]
    finally:
        (tmp_path / SPEC_FILE).rename(folder / SPEC_FILE)
