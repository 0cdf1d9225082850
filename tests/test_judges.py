"""The honest quality measures: a digit judge that says "bad" to noise and degraded digits and "good" to
real held-out digits; the clean-background and rough shares; `ddpm eval` reports them.

The degraded images here are made by this file's own generators (not the training script's), from the
held-out test digits, with seeds the training never used.
"""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.data import build_dataset, load_mnist
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.judges import (
    REJECT,
    border_brightness,
    border_width,
    clean_share,
    digit_quality,
    honest_confident,
    honest_confident_share,
    judge_probabilities,
    load_digit_judge,
    rough_level,
    rough_share,
    to_digit_size,
)
from ddpmlab.evaluate.run import EvalContext, EvalSettings, evaluate_model
from ddpmlab.models import build_model

N = 300  # images of each degraded kind
GREY = 30 / 255  # a background lifted by 30/255 of full scale: plainly grey


@pytest.fixture(scope="module")
def judge():
    torch.set_num_threads(1)
    return load_digit_judge()


@pytest.fixture(scope="module")
def digits():
    x, y = load_mnist("test")  # 500 digits neither network was trained on, ordered by class
    order = torch.randperm(len(y), generator=_gen(11))
    return x[order], y[order]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=g)


def _lift(x: torch.Tensor, offset) -> torch.Tensor:
    """The background raised by ``offset`` of full scale ([0, 1]), the white ink kept."""
    return x + 2 * offset * (1 - x) / 2


def gaussian_noise(x, y, g):
    return (_rand(N, -1, 0.5, g) + _rand(N, 0.2, 1, g) * torch.randn(N, 1, 28, 28, generator=g)).clamp(-1, 1)


def uniform_noise(x, y, g):
    return torch.rand(N, 1, 28, 28, generator=g) * 2 - 1


def blobs(x, y, g):
    """2-4 round Gaussian bumps, 2-6 pixels wide, on black."""
    r = torch.arange(28.0)
    img = torch.zeros(N, 1, 28, 28)
    for _ in range(int(torch.randint(2, 5, (1,), generator=g))):
        cx, cy, s = (5 + 18 * torch.rand(3, N, 1, 1, 1, generator=g)).unbind(0)
        s = 2 + s / 6
        img += torch.exp(-((r[None, None, None] - cx) ** 2 + (r[None, None, :, None] - cy) ** 2) / (2 * s ** 2))
    return 2 * img.clamp(0, 1) - 1


def smooth_fields(x, y, g):
    f = F.interpolate(torch.rand(N, 1, 4, 4, generator=g), size=(28, 28), mode="bilinear", align_corners=False)
    return (2 * f - 1).clamp(-1, 1)


def grey_background(x, y, g):
    return _lift(x[:N], _rand(N, 20 / 255, 0.5, g))


def grey_grainy_background(x, y, g):
    return (grey_background(x, y, g) + _rand(N, 0.05, 0.3, g) * torch.randn(N, 1, 28, 28, generator=g)).clamp(-1, 1)


def heavy_noise(x, y, g):
    return (x[:N] + _rand(N, 0.6, 1.2, g) * torch.randn(N, 1, 28, 28, generator=g)).clamp(-1, 1)


def two_digits(x, y, g):
    """Each digit with a random one of another class on top, both shifted together by up to 3 pixels."""
    other = torch.randperm(len(y), generator=g)
    other = [next(int(j) for j in other.roll(-i) if y[j] != y[i]) for i in range(N)]
    shift = torch.randint(-3, 4, (2,), generator=g).tolist()
    return torch.maximum(x[:N], torch.roll(x[other], shift, dims=(2, 3)))


def scribbles(x, y, g):
    """Six random points anywhere in the frame joined by straight strokes about 3 pixels wide."""
    pts = 3 + 22 * torch.rand(N, 6, 2, generator=g)
    t = torch.linspace(0, 1, 40)[:, None]
    path = (pts[:, :-1, None] * (1 - t) + pts[:, 1:, None] * t).reshape(N, -1, 2)  # points along the strokes
    grid = torch.stack(torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="xy"), -1).reshape(-1, 2)
    dist = torch.cdist(grid[None].expand(N, -1, -1), path).amin(-1)
    return (2 * (2 - dist).clamp(0, 1) - 1).reshape(N, 1, 28, 28)


DEGRADED = [gaussian_noise, uniform_noise, blobs, smooth_fields, grey_background, grey_grainy_background,
            heavy_noise, two_digits, scribbles]


@pytest.mark.parametrize("make", DEGRADED, ids=[f.__name__ for f in DEGRADED])
def test_judge_is_not_confident_on_noise_blobs_and_degraded_digits(judge, digits, make):
    x, y = digits
    bad = make(x, y, _gen(2024 + DEGRADED.index(make)))
    assert bad.shape == (N, 1, 28, 28) and bad.min() >= -1 and bad.max() <= 1
    assert honest_confident_share(bad, judge) < 0.05


def test_judge_is_confident_and_right_on_real_held_out_digits_as_recorded(judge, digits):
    x, y = digits
    p = judge_probabilities(x, judge)
    confident = honest_confident(p)
    right = p.argmax(1) == y
    assert p.shape == (500, 11) and torch.allclose(p.sum(1), torch.ones(500), atol=1e-5)
    assert confident.float().mean() >= 0.85
    assert right[confident].float().mean() >= 0.95
    held_out = json.loads(judge.metadata["held_out"])  # the file records what it scores here
    assert held_out["test_confident"] == pytest.approx(float(confident.float().mean()), abs=1e-4)
    assert held_out["test_confident_accuracy"] == pytest.approx(float(right[confident].float().mean()), abs=1e-4)
    assert judge.metadata["script"] == "benchmarks/train_mnist_judge.py"


def test_honest_share_counts_only_digit_classes_above_the_level():
    p = torch.tensor([[0.85] + [0.015] * 10,  # a confident "0"
                      [0.79] + [0.021] * 10,  # a "0", not confident
                      [0.0] * 10 + [1.0],  # reject
                      [0.1] * 9 + [0.0, 0.1]])  # uncertain
    assert honest_confident(p).tolist() == [True, False, False, False]
    assert REJECT == 10


def test_clean_background_share_sees_a_lifted_background(digits):
    x, _ = digits
    assert clean_share(x) == 1.0
    assert clean_share(_lift(x, GREY)) == 0.0
    b = border_brightness(_lift(x, GREY))
    assert b.median() == pytest.approx(GREY, abs=1e-6) and b.min() >= GREY - 1e-6  # mostly bare background


def test_clean_background_works_for_colour_images_of_any_size():
    x = -torch.ones(4, 3, 48, 64)  # black
    k = border_width(48, 64)
    assert k == 3
    x[1, 2, :, :k] = 1.0  # a blue band on the left edge: lit in one channel
    x[2, :, k:-k, k:-k] = 1.0  # white inside only: still clean
    x[3, 0] = -1 + 2 * GREY  # a dark red background
    lit = (48 * k) / (2 * k * 64 + 2 * k * (48 - 2 * k))  # the band's share of the border
    assert border_brightness(x).tolist() == pytest.approx([0.0, lit, 0.0, GREY], abs=1e-6)
    assert clean_share(x) == 0.5


def test_rough_share_separates_real_digits_from_grainy_ones(digits):
    x, _ = digits
    level = rough_level(load_mnist("train")[0])
    assert rough_share(x, level) <= 0.01  # held-out real digits are as smooth as the training ones
    grain = (x + 0.4 * torch.randn(x.shape, generator=_gen(7))).clamp(-1, 1)  # sigma 0.2 of full scale
    assert rough_share(grain, level) >= 0.95
    assert rough_share(grain, x) == rough_share(grain, rough_level(x))
    faint = (x + (2 / 255) * torch.randn(x.shape, generator=_gen(8))).clamp(-1, 1)  # sigma 1/255: invisible
    light = (x + (16 / 255) * torch.randn(x.shape, generator=_gen(9))).clamp(-1, 1)  # sigma 8/255: a speckle
    assert rough_share(faint, level) <= 0.01 and rough_share(light, level) >= 0.95


def _eval(argv, capsys):
    rc = main(["eval", *argv, "--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_of_a_run_of_8x8_digits_reports_clean_and_rough_but_not_the_judge(straight_run, capsys, one_thread):
    """The judge reads 28x28 digits only: at another size the defaults leave it out, and asking for it is one line."""
    rc, out, err = _eval([str(straight_run), "--n", "40", "--steps", "2", "--metrics", "clean,rough",
                          "--out", str(straight_run.parent / "eval8.json")], capsys)
    assert rc == 0, err
    res = json.loads(Path(out.strip().splitlines()[-1].removeprefix("wrote ")).read_text())
    assert set(res["metrics"]) == {"clean", "rough"} and "clean" in out and "rough" in out
    b = res["data_baseline"]
    assert b["rough"] <= 0.05  # data against the roughest of other data images
    rc, out, err = _eval([str(straight_run), "--n", "40", "--steps", "2", "--metrics", "judge"], capsys)
    assert rc == 2 and "1x28x28" in err and len(err.strip().splitlines()) == 1, err


def test_default_metrics_name_the_judge_only_for_28x28_digits():
    from ddpmlab.evaluate.run import default_metrics

    assert default_metrics(True, False, "classifier", (1, 28, 28))[-3:] == ["judge", "clean", "rough"]
    assert default_metrics(True, False, "inception", (3, 32, 32))[-2:] == ["clean", "rough"]
    assert "judge" not in default_metrics(True, False, "classifier", (1, 8, 8))
    assert default_metrics(False, False, "classifier") == ["swd", "mmd"]


def test_training_monitor_records_the_honest_measures(tmp_path, one_thread):
    import csv

    from ddpmlab.config import load_config
    from ddpmlab.training.tasks.diffusion import train

    tiny = ["model.num_classes=null", "unet.base_channels=8", "unet.norm_groups=4", "unet.channel_mults=[1,2]",
            "unet.attention_resolutions=[]", "data.split=test"]
    cfg = load_config("mnist", [f"train.out_dir={tmp_path}", "train.name=m", "train.minutes=null", "train.steps=2",
                                "train.batch_size=8", "train.eval_every=2", "train.eval_n=32", "train.eval_steps=2",
                                "train.eval_metrics=[judge,clean,rough]", "train.sample_n=4", "train.sample_steps=2",
                                *tiny])
    run = train(cfg, progress=False)
    row = list(csv.DictReader((run / "eval.csv").open()))[-1]
    assert set(row) == {"step", "judge", "judge_vs_real", "clean", "rough"}
    # two training steps draw noise: no digit, no clean background, rough
    assert float(row["judge"]) < 0.05 and float(row["clean"]) == 0.0 and float(row["rough"]) > 0.9


def _mixed(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Clean digits, digits on grey, grainy digits and digits past [-1, 1] (which a picture clamps): 40 each."""
    grey = _lift(x[40:80], _rand(40, 20 / 255, 0.4, g))
    grainy = (x[80:120] + _rand(40, 0.05, 0.5, g) * torch.randn(40, 1, 28, 28, generator=g)).clamp(-1, 1)
    return torch.cat([x[:40], grey, grainy, 1.3 * x[120:160]])


def test_digit_quality_gives_the_numbers_of_ddpm_eval(digits, one_thread):
    """The benchmarks' digit_quality and `ddpm eval --metrics judge,clean,rough` score the same images alike."""
    x = _mixed(digits[0], _gen(21))
    cfg = load_config("mnist", ["data.split=test", "model.num_classes=null", "unet.base_channels=8",
                                "unet.norm_groups=4", "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]"])
    ctx = EvalContext(cfg, build_model(cfg), NoiseSchedule.from_config(cfg.diffusion), build_dataset(cfg),
                      EvalSettings(metrics=["judge", "clean", "rough"], n=len(x), steps=2, batch_size=64), "cpu",
                      progress=False)
    ctx.__dict__["samples"] = (x, None)  # these images stand for the model's samples
    res = evaluate_model(ctx)
    real = load_mnist("test")[0]
    ours = digit_quality(x, real, rough=ctx.rough_level)  # ddpm eval's rough level: other data images
    assert set(ours) == {"judge", "judge_vs_real", "clean", "rough"}
    assert ours == pytest.approx(res["metrics"], rel=1e-12, abs=0)
    assert 0.2 < ours["judge"] < 0.8 and 0.4 < ours["clean"] < 0.9 and 0 < ours["rough"] < 0.4  # not all or none
    assert digit_quality(real, real)["judge"] == res["data_baseline"]["judge"]  # the real digits' own share


def test_digit_quality_of_real_digits_is_the_reference_at_any_size(digits):
    """Real digits against themselves: judge_vs_real 1, all clean, none rougher than the roughest; at 16x16 too
    (the judge reads them at 28x28), where digits on grey lose their clean background."""
    x = digits[0]
    assert digit_quality(x, x) == {"judge": pytest.approx(0.92, abs=0.06), "judge_vs_real": 1.0, "clean": 1.0,
                                   "rough": 0.0}
    small = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False, antialias=True)
    assert to_digit_size(small).shape == (len(x), 1, 28, 28) and to_digit_size(x) is x
    q = digit_quality(small, small)
    assert q["judge"] > 0.8 and (q["judge_vs_real"], q["clean"], q["rough"]) == (1.0, 1.0, 0.0)
    grey = digit_quality(_lift(small, 40 / 255), small)
    assert grey["clean"] == 0.0 and grey["judge_vs_real"] < 0.5
    with pytest.raises(DDPMError, match="same size"):
        digit_quality(small, x)
