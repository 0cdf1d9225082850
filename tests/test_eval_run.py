"""`ddpm eval`, `ddpm viz` and evaluation during training on tiny runs; bad input gives one clear line."""

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ddpmlab.cli import main
from ddpmlab.config import load_config, save_config
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import save_checkpoint
from ddpmlab.models import build_model

TINY_UNET = ["model.num_classes=null", "unet.base_channels=8", "unet.norm_groups=4", "unet.channel_mults=[1,2]",
             "unet.attention_resolutions=[]"]


@pytest.fixture(autouse=True)
def env(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_run(root: Path, config: str, overrides=(), step: int = 10) -> Path:
    """A run directory with an untrained model (weights = EMA), without training it."""
    cfg = load_config(config, list(overrides))
    run = root / f"{config}-run"
    run.mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    sd = build_model(cfg).state_dict()
    save_checkpoint(run, step, sd, sd, {"state": {}, "param_groups": []})
    return run


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("e"), "mnist", TINY_UNET + ["data.split=test"])  # 500 digits


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("t"), "toy2d", ["mlp.hidden=32", "mlp.num_layers=2"])


def test_eval_scores_an_untrained_model_far_below_the_data(mnist_run, capsys):
    rc = main(["eval", str(mnist_run), "--n", "150", "--steps", "2", "--batch-size", "75", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    path = Path(out.strip().splitlines()[-1].removeprefix("wrote "))
    res = json.loads(path.read_text())
    m, b = res["metrics"], res["data_baseline"]
    assert set(m) == {"fid", "kid", "kid_std", "is", "is_std", "precision", "recall", "judge", "judge_vs_real",
                      "clean", "rough"}
    # the honest measures: noise is no digit, has no clean background and is rough; real digits are the opposite
    assert m["judge"] < 0.05 and b["judge"] > 0.85 and m["judge_vs_real"] == pytest.approx(m["judge"] / b["judge"])
    assert (m["clean"], b["clean"]) == (0.0, 1.0) and m["rough"] > 0.95 and b["rough"] < 0.02
    # an untrained network draws noise: far from the digits that 150 real digits match closely
    assert m["fid"] > 20 * b["fid"] and m["kid"] > b["kid"] and m["precision"] < b["precision"]
    assert b["precision"] > 0.8 and b["is"] > 5  # held-out digits: high, but not trivially 1
    assert res["baseline"]["n"] == 150 and not res["baseline"]["notes"]
    s = res["settings"]  # no --sampler: the run's own sampler (train.sample_sampler of the mnist config)
    assert (s["n"], s["sampler"], s["steps"], s["seed"], s["extractor"]) == (150, "dpmpp_2m_sde", 2, 0, "classifier")
    assert res["reference"]["n"] == 500 and res["run"]["step"] == 10 and res["run"]["weights"] == "ema"
    assert res["extractor"]["identity"].startswith("mnist-classifier-")
    assert "fid" in out and "data (n=150)" in out and "judge_vs_real" in out and "rough" in out
    # the second evaluation reads the reference statistics from the cache
    assert main(["eval", str(mnist_run), "--n", "150", "--steps", "2", "--batch-size", "75", "--metrics", "fid",
                 "--no-progress", "--out", str(path.with_name("again.json"))]) == 0
    again = json.loads(path.with_name("again.json").read_text())
    assert again["reference"]["from_cache"] and again["metrics"]["fid"] == pytest.approx(m["fid"], rel=1e-9)


def test_eval_of_a_toy_run_reports_distances_to_fresh_data(toy_run, capsys):
    assert main(["eval", str(toy_run), "--n", "400", "--steps", "5", "--no-progress"]) == 0
    res = json.loads(Path(capsys.readouterr().out.strip().splitlines()[-1][6:]).read_text())
    assert set(res["metrics"]) == {"swd", "mmd"}
    assert res["metrics"]["swd"] > 3 * res["data_baseline"]["swd"]
    assert res["metrics"]["mmd"] > 10 * abs(res["data_baseline"]["mmd"])


@pytest.mark.parametrize("argv, words", [
    (["--n", "100"], ["more than 128", "--n"]),
    (["--extractor", "inception"], ["pt_inception-2015-12-05", "--inception-weights"]),
    (["--inception-weights", "/nonexistent/w.pth"], ["/nonexistent/w.pth", "does not exist"]),
    (["--metrics", "fid,swd"], ["swd", "2-D"]),
    (["--metrics", "acc"], ["class-conditional"]),
    (["--metrics", "bogus"], ["bogus"]),
    (["--steps", "5000"], ["--steps"]),
])
def test_eval_bad_input_is_one_clear_line(mnist_run, capsys, argv, words):
    rc = main(["eval", str(mnist_run), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err


def test_eval_of_a_run_without_ema_weights_names_the_fix(tmp_path, capsys):
    run = make_run(tmp_path, "mnist", TINY_UNET)
    (run / "checkpoints" / "step_0000010" / "ema.safetensors").unlink()
    rc = main(["eval", str(run), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "EMA" in err and "--weights model" in err and len(err.splitlines()) == 1


def test_inception_network_has_the_reference_architecture():
    from ddpmlab.evaluate.inception import FIDInceptionV3

    net = FIDInceptionV3().eval()
    # torchvision's inception_v3 without the aux head: 23,834,568 parameters for 1000 classes; FID's has 1008
    assert sum(p.numel() for p in net.parameters()) == 23_834_568 + 8 * 2049
    with torch.no_grad():
        assert net.features(torch.zeros(1, 1, 28, 28)).shape == (1, 2048)


def test_inception_weights_load_from_a_local_file_only(tmp_path):
    from safetensors.torch import save_file

    from ddpmlab.evaluate.inception import FIDInceptionV3, load_fid_inception

    torch.manual_seed(0)
    ref = FIDInceptionV3().eval()
    path = tmp_path / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    net, digest = load_fid_inception(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(net.features(x), ref.features(x), atol=1e-5)
    assert len(digest) == 64 and not net.training
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(DDPMError, match="pt_inception-2015-12-05"):
        load_fid_inception(wrong)


def test_forward_steps_follow_q_of_x_t_given_x0():
    from ddpmlab.diffusion.schedules import NoiseSchedule
    from ddpmlab.viz import forward_steps

    s = NoiseSchedule.make("linear", 1000)
    x0 = torch.full((4000, 2), 0.7)
    xs = forward_steps(x0, s, [0, 300, 999], seed=0)
    for x, t in zip(xs, [0, 300, 999]):
        abar = float(s.alphas_cumprod[t])  # Ho et al. 2020, Eq. 4: N(sqrt(abar) x0, (1 - abar) I)
        assert float(x.mean()) == pytest.approx(abar ** 0.5 * 0.7, abs=0.03)
        assert float(x.std()) == pytest.approx((1 - abar) ** 0.5, rel=0.05, abs=0.003)


def _png_size(path):
    with Image.open(path) as im:
        return im.format, im.size


def test_each_viz_command_writes_its_files(mnist_run, toy_run, tmp_path, capsys):
    out = tmp_path / "viz"
    assert main(["viz", "forward", str(mnist_run), "--n", "2", "--t", "0,10,999", "--out", str(out)]) == 0
    assert main(["viz", "reverse", str(mnist_run), "--sampler", "ddim", "--steps", "8", "--n", "4", "--frames", "4",
                 "--out", str(out)]) == 0
    assert main(["viz", "schedules", "--T", "100", "--out", str(out)]) == 0
    assert main(["viz", "toy", str(toy_run), "--n", "300", "--steps", "6", "--frames", "3", "--out", str(out)]) == 0
    assert main(["viz", "grid", str(mnist_run), "--sampler", "ddim", "--n", "4", "--steps", "2",
                 "--out", str(out)]) == 0
    written = [Path(line[6:]) for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    names = sorted(p.name for p in written)
    assert names == sorted(["forward.png", "reverse_ddim8.gif", "reverse_ddim8.png", "schedules.png",
                            "toy_data.png", "toy_forward.png", "toy_reverse.png", "toy_diffusion.gif",
                            "grid_ddim2_seed0.png"])
    for p in written:
        assert p.parent == out and _png_size(p)[0] in ("PNG", "GIF")
    with Image.open(out / "reverse_ddim8.gif") as gif:
        assert gif.n_frames == 5  # x_T and the 4 recorded steps
    with Image.open(out / "toy_diffusion.gif") as gif:
        assert gif.n_frames == 3 + 4  # 3 forward frames, then x_T and 3 reverse frames


def test_viz_bad_input_is_one_clear_line(mnist_run, capsys):
    for argv, word in [(["forward", str(mnist_run), "--t", "0,5000"], "--t"),
                       (["schedules", "--schedules", "linear,zigzag"], "zigzag"),
                       (["toy", str(mnist_run)], "2D toy"),
                       (["loss", str(mnist_run)], "log.csv"),
                       (["grid"], "--npz")]:
        rc = main(["viz", *argv])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and word in err and len(err.splitlines()) == 1, (argv, err)


def test_training_evaluates_every_n_steps_into_csv_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ddpmlab.training.tasks.diffusion import train

    cfg = load_config("toy2d", [f"train.out_dir={tmp_path}", "train.name=t", "train.steps=40", "train.log_every=10",
                                "train.eval_every=20", "train.eval_n=200", "train.eval_steps=5", "train.sample_n=50",
                                "train.sample_steps=5", "train.sample_sampler=ddim", "train.save_every=20",
                                "mlp.hidden=32", "mlp.num_layers=2"])
    run = train(cfg, progress=False)
    rows = list(csv.DictReader((run / "eval.csv").open()))
    assert [int(r["step"]) for r in rows] == [20, 40] and all(float(r["swd"]) > 0 for r in rows)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "eval/swd", "eval/mmd"} <= set(tags["scalars"]) and "samples" in tags["images"]
    assert [e.step for e in acc.Scalars("eval/swd")] == [20, 40]
    assert [e.value for e in acc.Scalars("eval/swd")] == pytest.approx([float(r["swd"]) for r in rows], rel=1e-4)
    losses = [float(r["loss"]) for r in csv.DictReader((run / "log.csv").open())]
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx(losses, rel=1e-4)


def test_training_refuses_an_evaluation_that_cannot_run(tmp_path):
    from ddpmlab.errors import ConfigError
    from ddpmlab.training.tasks.diffusion import train

    cfg = load_config("mnist", [f"train.out_dir={tmp_path}", "train.eval_every=10", "train.eval_n=64", *TINY_UNET])
    with pytest.raises(ConfigError, match="train.eval_n"):
        train(cfg, progress=False)


def test_training_evaluates_clean_and_rough_on_colour_images_without_an_extractor(tmp_path):
    """clean and rough read pixels only: a 3x16x16 run without Inception weights evaluates them."""
    from ddpmlab.training.tasks.diffusion import train

    folder = tmp_path / "data"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(folder / f"{i}.png")
    cfg = load_config("mnist", [f"train.out_dir={tmp_path}", "train.name=rgb", "data.dataset=folder",
                                f"data.path={folder}", "data.image_size=16", "train.steps=4", "train.minutes=null",
                                "train.batch_size=4", "train.eval_every=2", "train.eval_n=4", "train.sample_steps=2",
                                "train.eval_steps=2", "train.eval_metrics=[clean,rough]", "train.sample_n=4",
                                *TINY_UNET])
    train(cfg, progress=False)
    rows = list(csv.DictReader((tmp_path / "rgb" / "eval.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4]
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("clean", "rough"))
