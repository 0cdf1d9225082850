"""The demo's ControlNet tab: it offers the ControlNets of the loaded run (given beside it or found next to it), and the
same control picture (uploaded, or drawn on the sketchpad), scale and seed give the images `ddpm sample --controlnet
--control` writes; a control of another size is resized with a note; bad input is one line."""

import numpy as np
import pytest
import torch
from _util import TINY_DIGITS, perturb
from PIL import Image
from safetensors.torch import save_file

from ddpmlab.cli import main
from ddpmlab.demo import Limits, Runs
from ddpmlab.demo import controlnet as ctl
from ddpmlab.errors import DDPMError
from ddpmlab.runs import resolve_device
from ddpmlab.runs.control import load_controlnet

pytestmark = pytest.mark.usefixtures("one_thread")

ASK = dict(sampler="ddim", steps=3, seed=2, n=3, guidance=0)  # the tab's fields: the control alone decides


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    """A tiny class-conditional digits run, a 2-step edge ControlNet beside it as train-controlnet names it (its EMA
    then random, so that it steers visibly), and one elsewhere."""
    root = tmp_path_factory.mktemp("demo_cn")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", *TINY_DIGITS, "train.steps=2", f"train.out_dir={root}", "train.name=base"]) == 0
        for out, name in ((root, "base-controlnet-edges-1"), (root / "elsewhere", "cn")):
            assert main(["train-controlnet", str(root / "base"), "train.steps=2", "train.save_every=2",
                         f"train.out_dir={out}", f"train.name={name}", "--no-progress"]) == 0
            net = perturb(load_controlnet(out / name)[1], seed=4, scale=0.1)
            save_file({k: v.contiguous() for k, v in net.state_dict().items()},
                      str(out / name / "checkpoints" / "step_0000002" / "ema.safetensors"))
    finally:
        torch.set_num_threads(n)
    return root


def _cli(root, tmp_path, name, picture, *more):
    """`ddpm sample BASE --controlnet CN --control PICTURE ... --out FOLDER/ --npz`: (samples, grid as uint8)."""
    assert main(["sample", str(root / "base"), "--controlnet", str(root / "base-controlnet-edges-1"), "--control",
                 str(picture), "--sampler", "ddim", "--steps", "3", "--seed", "2", "--n", "3", "--guidance", "0",
                 *more, "--out", f"{tmp_path / name}/", "--npz", "--no-progress"]) == 0
    return np.load(tmp_path / name / "samples.npz")["samples"], _png(tmp_path / name / "grid.png")


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img)


def test_the_tab_offers_the_runs_controlnets_and_draws_what_ddpm_sample_draws(runs_root, tmp_path):
    runs = Runs([runs_root / "base", runs_root / "elsewhere" / "cn"], resolve_device("cpu"), tmp_path / "page")
    base, beside = str(runs_root / "base"), str(runs_root / "base-controlnet-edges-1")
    assert runs.dirs == [base]  # a ControlNet given is no run of its own
    assert ctl.controlnet_choices(runs, base) == [str(runs_root / "elsewhere" / "cn"), beside]
    square = np.zeros((8, 8), np.uint8)
    square[2:6, 2:6] = 255
    Image.fromarray(square).save(tmp_path / "square.png")
    res = ctl.control_sample(runs, base, beside, control=str(tmp_path / "square.png"), scale=0.8, **ASK)
    x, grid = _cli(runs_root, tmp_path, "cli", tmp_path / "square.png", "--control-scale", "0.8")
    assert np.array_equal(np.load(res.sample.npz)["samples"], x) and np.array_equal(_png(res.sample.picture), grid)
    assert res.sample.text.startswith(f"ControlNet {beside} at scale 0.8 on the uploaded picture; 3 samples: ddim")
    assert "note" not in res.sample.text and np.array_equal(_png(res.control), square)  # read at its own size
    plain = ctl.control_sample(runs, base, beside, control=str(tmp_path / "square.png"), scale=0, **ASK)
    assert (plain.sample.x - res.sample.x).abs().max() > 1e-2  # the scale reaches the ControlNet
    assert ctl.control_sample(runs, base, beside, control=str(tmp_path / "square.png"), scale=0.8,
                              **ASK).sample.x.equal(res.sample.x)  # loaded once, the same pixels again


def test_a_drawing_of_another_size_is_resized_with_a_note_as_ddpm_sample_reads_it(runs_root, tmp_path):
    runs = Runs([runs_root / "base"], resolve_device("cpu"), tmp_path / "page")
    base, beside = str(runs_root / "base"), str(runs_root / "base-controlnet-edges-1")
    canvas = np.zeros((ctl.SKETCH_SIZE, ctl.SKETCH_SIZE, 4), np.uint8)  # the sketchpad: RGBA strokes
    canvas[40:200, 60:90] = (255, 255, 255, 255)
    canvas[100:120, 60:220] = (255, 255, 255, 128)  # half transparent: grey over black
    sketch = {"background": None, "layers": [canvas], "composite": canvas}
    res = ctl.control_sample(runs, base, beside, sketch=sketch, **ASK)
    drawn = _png(res.picture)
    assert drawn.shape == (256, 256, 3) and drawn[50, 70].tolist() == [255] * 3
    assert drawn[110, 150].tolist() == [128] * 3 and drawn[10, 10].tolist() == [0] * 3
    assert "note: --control" in res.sample.text and "256x256 pixels; scaled and center-cropped to 8x8" in \
        res.sample.text
    x, grid = _cli(runs_root, tmp_path, "cli", res.picture)
    assert np.array_equal(np.load(res.sample.npz)["samples"], x) and np.array_equal(_png(res.sample.picture), grid)
    read = _png(res.control)
    assert read.shape == (8, 8) and read[2:6, 2].min() > 100 and read[0, 7] == 0  # the white stroke, scaled down
    assert 20 < read[3, 5] < 128  # the grey one


def test_bad_input_is_one_line(runs_root, tmp_path):
    runs = Runs([runs_root / "base"], resolve_device("cpu"), tmp_path / "page")
    base, beside = str(runs_root / "base"), str(runs_root / "base-controlnet-edges-1")
    blank = np.zeros((16, 16, 3), np.uint8)
    for kwargs, message in (
        (dict(controlnet=beside, sketch={"composite": blank}), "no control picture: draw on the sketchpad"),
        (dict(controlnet=None, control="x.png"), f"no ControlNet chosen: pick one of {beside}"),
        (dict(controlnet=str(runs_root / "elsewhere" / "cn"), control="x.png"), "is not served for the run"),
        (dict(controlnet=beside, control=str(tmp_path / "missing.png")), "does not exist"),
        (dict(controlnet=beside, control="x.png", scale="strong"), "control scale must be a number"),
        (dict(controlnet=beside, sketch={"composite": blank + 255}, n=9, limits=Limits(8, 100)), "n = 9 samples"),
    ):
        with pytest.raises(DDPMError) as e:
            ctl.control_sample(runs, base, **{**ASK, **kwargs})
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(DDPMError, match="got only ControlNet runs; give their base too"):
        Runs([runs_root / "elsewhere" / "cn"], resolve_device("cpu"), tmp_path / "page")


def test_the_page_has_the_tab_and_its_handler_draws_the_actions_pictures(runs_root, tmp_path):
    gr = pytest.importorskip("gradio")
    from ddpmlab.demo.app import RUN_SAMPLER, Handlers, build_app

    runs = Runs([runs_root / "base"], resolve_device("cpu"), tmp_path / "page")
    base, beside = str(runs_root / "base"), str(runs_root / "base-controlnet-edges-1")
    build_app(runs)  # the sketchpad and the tab build
    h = Handlers(gr, runs, Limits())
    updates = h.run(base, "ema")
    net, classes = updates[9], updates[10]
    assert net["choices"] == [(beside, beside)] or net["choices"] == [beside]
    assert net["value"] == beside and classes["visible"]
    square = np.zeros((8, 8), np.uint8)
    square[2:6, 2:6] = 255
    Image.fromarray(square).save(tmp_path / "square.png")
    said, read, picture, files = h.controlnet(base, "ema", beside, 0.8, None, str(tmp_path / "square.png"),
                                              RUN_SAMPLER, 3, 2, 3, None, 0, None)
    res = ctl.control_sample(runs, base, beside, control=str(tmp_path / "square.png"), scale=0.8, steps=3, seed=2,
                             n=3, guidance=0)
    assert said == res.sample.text and np.array_equal(_png(picture), _png(res.sample.picture))
    assert len(files) == 4 and read.shape == (128, 128, 3) and np.array_equal(read[::16, ::16, 0], square)
