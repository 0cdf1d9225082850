"""The shipped spoken-digit classifier and ddpm eval on sound: acc, is and fd against held-out clips, refusals."""

import json

import pytest
import torch
from safetensors import safe_open

from ddpmlab.config import load_config
from ddpmlab.data.spoken_digits import DIGITS, TRAIN, write_spoken_digits
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import OptionError
from ddpmlab.evaluate import metrics as M
from ddpmlab.evaluate.run import EvalContext, EvalSettings, check_metrics, default_metrics, evaluate_model
from ddpmlab.evaluate.speech_classifier import (
    NOT_A_DIGIT,
    WEIGHTS,
    confidence,
    digit_order,
    load_speech_classifier,
    not_digits,
    probabilities,
    sound_reference,
    speech_extractor,
)
from ddpmlab.models import build_model
from ddpmlab.runs import Run

pytest.importorskip("espeakng_loader")

TINY_DIFFWAVE = ["diffwave.preset=null", "diffwave.layers=2", "diffwave.channels=4", "diffwave.dilation_cycle=2",
                 "diffwave.embed_dim=16", "diffwave.label_dim=4"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """65 training and 13 held-out clips a digit, of a seed neither the classifier (1) nor the default (0) uses."""
    return write_spoken_digits(tmp_path_factory.mktemp("sd") / "digits", n_per_digit=65, seed=3, progress=False)


def sound_run(digits, *overrides, class_names=tuple(sorted(DIGITS))) -> Run:
    """An untrained tiny DiffWave run in memory, trained (as its config says) on ``digits``/train."""
    cfg = load_config("spoken_digits", [f"data.path={digits / TRAIN}", *TINY_DIFFWAVE, *overrides])
    return Run(cfg, build_model(cfg), NoiseSchedule.from_config(cfg.diffusion), torch.device("cpu"),
               class_names=list(class_names))


def context(run, samples, **settings) -> EvalContext:
    """ddpm eval's context on ``run`` with its samples given: (clips (n, 1, 16000), labels (n,))."""
    s = EvalSettings(n=len(samples[0]), **settings)
    ctx = EvalContext(run.cfg, run.model, run.schedule, sound_reference(run), s, "cpu", progress=False,
                      use_cache=False, run=run)
    ctx.__dict__["samples"] = samples
    return ctx


def test_the_shipped_classifier_is_small_and_its_file_records_what_it_was_measured_on():
    assert WEIGHTS.stat().st_size < 1_000_000
    with safe_open(str(WEIGHTS), framework="pt") as f:
        meta = f.metadata()
    assert float(meta["held_out_accuracy"]) >= 0.95 and float(meta["garbage_not_a_digit"]) >= 0.9
    assert json.loads(meta["white_noise"])["not_a_digit"] >= 0.9 and json.loads(meta["silence"])["not_a_digit"] == 1
    net = load_speech_classifier()
    assert not net.training and net(torch.zeros(2, 1, 16000)).shape == (2, NOT_A_DIGIT + 1)


def test_real_held_out_voices_are_recognised_and_garbage_is_called_not_a_digit(digits, one_thread):
    held = sound_reference(sound_run(digits))
    assert len(held) == 130 and "held-out clips" in held.description
    net = load_speech_classifier()
    p = probabilities(net, held.clips)
    truth = torch.tensor(digit_order(held.class_names))[held.labels]
    assert (p.argmax(1) == truth).float().mean() >= 0.9
    g = torch.Generator().manual_seed(0)
    white = torch.randn(40, 1, 16000, generator=g) * torch.logspace(-3, -0.5, 40)[:, None, None]
    for what, x in (("white noise", white.clamp(-1, 1)), ("silence", torch.zeros(4, 1, 16000)),
                    ("made garbage", not_digits(held.clips[:60], g))):
        said = confidence(probabilities(net, x))
        assert said["not_a_digit"] >= 0.85, f"{what}: {said}"
        digit_p = probabilities(net, x)[:, :NOT_A_DIGIT].max(1).values
        assert digit_p.mean() < 0.2, f"{what}: a digit's mean probability {digit_p.mean():.2f}"


def test_ddpm_eval_scores_real_clips_as_a_direct_computation_does_and_fd_of_a_set_with_itself_is_zero(digits,
                                                                                                     one_thread):
    run = sound_run(digits)
    held = sound_reference(run)
    ctx = context(run, (held.clips, held.labels))  # the "samples" are the held-out clips themselves
    res = evaluate_model(ctx)
    assert res["settings"]["metrics"] == ["acc", "is", "fd"] and res["extractor"]["name"] == "speech-digits"
    logits = load_speech_classifier()(held.clips)
    truth = torch.tensor(digit_order(held.class_names))[held.labels]
    assert res["metrics"]["acc"] == pytest.approx(float((logits.argmax(1) == truth).float().mean()), abs=1e-9)
    assert res["metrics"]["acc"] >= 0.9 and res["metrics"]["is"] > 5
    assert abs(res["metrics"]["fd"]) < 1e-3  # the samples are the reference: their Frechet distance is 0
    f = ctx.features("samples")
    assert M.fid(M.feature_sums(f), f) == pytest.approx(res["metrics"]["fd"], abs=1e-6)
    assert res["baseline"]["n"] == 65 and res["data_baseline"]["acc"] >= 0.9  # half the held-out clips
    assert res["reference"]["dataset"].startswith("the held-out clips in") and res["reference"]["n"] == 130


def test_noise_asked_to_be_digits_scores_low(digits, one_thread):
    run = sound_run(digits)
    g = torch.Generator().manual_seed(1)
    noise = (torch.randn(130, 1, 16000, generator=g) * 0.1).clamp(-1, 1)
    res = evaluate_model(context(run, (noise, torch.arange(130) % 10), baseline=False))
    assert res["metrics"]["acc"] <= 0.05 and res["metrics"]["is"] < 1.5 and res["metrics"]["fd"] > 10


def test_the_logits_follow_the_runs_class_order_whatever_the_folder_names_case():
    order = digit_order(["Zero", "One", "Two", "three", "FOUR", "five", "six", "seven", "eight", "nine"])
    assert order == list(range(10)) and digit_order(sorted(DIGITS)) == [DIGITS.index(n) for n in sorted(DIGITS)]
    x = (torch.randn(3, 1, 16000, generator=torch.Generator().manual_seed(2)) * 0.05)
    plain, ordered = speech_extractor(), speech_extractor(sorted(DIGITS))
    a, b = plain.logits(x), ordered.logits(x)
    assert torch.equal(b[:, :10], a[:, torch.tensor(digit_order(sorted(DIGITS)))]) and torch.equal(b[:, 10], a[:, 10])
    with pytest.raises(OptionError, match="this run's classes are cat, dog"):
        digit_order(["cat", "dog"])


@pytest.mark.parametrize("name", ["fid", "kid", "pr", "judge", "clean", "rough", "swd"])
def test_metrics_of_other_data_are_refused_on_sound_in_one_line(name):
    with pytest.raises(OptionError, match=f"'{name}' is for (images|2-D points); this run's data are sound "
                                          r"\(use acc, is, fd\)") as e:
        check_metrics([name], False, None, "audio")
    assert "\n" not in str(e.value)
    with pytest.raises(OptionError, match="'fd' is for sound; this run's data are images"):
        check_metrics(["fd"], True, (1, 28, 28), "image")
    assert default_metrics(False, True, "classifier", None, "audio") == ["acc", "is", "fd"]
    assert default_metrics(False, False, "classifier", None, "audio") == ["is", "fd"]


def test_what_the_classifier_cannot_judge_is_refused_in_one_line(digits, tmp_path):
    with pytest.raises(OptionError, match="drop the extractor 'inception'"):
        sound_reference(sound_run(digits), "inception")
    with pytest.raises(OptionError, match="makes 1 channel.* of 8000 samples at 8000 Hz"):
        sound_reference(sound_run(digits, "data.sample_rate=8000", "data.length=8000", "data.n_fft=256",
                                  "data.hop_length=64", "diffwave.upsample=[8,8]"))
    with pytest.raises(OptionError, match="this run's classes .* are not those of the held-out clips"):
        sound_reference(sound_run(digits, class_names=[f"c{i}" for i in range(10)]))
    with pytest.warns(UserWarning, match="own training clips are the reference"):
        data = sound_reference(sound_run(digits, f"data.path={digits / 'held_out'}"))
    assert len(data) == 130 and data.description.startswith("the training clips in")


def test_ddpm_eval_on_a_sound_run_and_ddpm_viz_modes_that_draw_no_sound(digits, tmp_path, one_thread, capsys):
    from ddpmlab.cli import main

    train = ["train", "--config", "spoken_digits", f"data.path={digits / TRAIN}", *TINY_DIFFWAVE,
             "train.minutes=null", "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "train.ema_start=1",
             "train.sample_n=2", "train.sample_steps=2", "train.sample_sampler=ddim", "train.tensorboard=false",
             "train.device=cpu", f"train.out_dir={tmp_path}", "train.name=digits", "--no-progress"]
    assert main(train) == 0
    run = str(tmp_path / "digits")
    capsys.readouterr()
    assert main(["eval", run, "--metrics", "acc,is", "--n", "20", "--sampler", "ddim", "--steps", "2",
                 "--no-progress", "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "speech-digits features" in out
    res = json.loads(next((tmp_path / "digits" / "eval").glob("*.json")).read_text())
    assert res["metrics"]["acc"] <= 0.2 and res["data_baseline"]["acc"] >= 0.9  # untrained: noise, not digits
    assert main(["eval", run, "--metrics", "judge", "--n", "20", "--no-progress"]) == 2
    assert "'judge' is for images; this run's data are sound (use acc, is, fd)" in capsys.readouterr().err
    for kind in ("forward", "reverse", "toy"):
        assert main(["viz", kind, run, "--no-progress"] if kind != "forward" else ["viz", kind, run]) == 2
        err = capsys.readouterr().err.strip()
        assert "is sound (data.dataset=audio)" in err and "\n" not in err, err
