"""Sound as log-mel images (data.representation=mel): the fixed normalisation, the image of a clip against librosa,
a mel run trained on the image path, resumed bit for bit, sampled as WAV files made by Griffin-Lim or a vocoder,
scored end to end by ddpm eval; one-line refusals."""

import json

import numpy as np
import pytest
import torch

from ddpmlab.config import load_config
from ddpmlab.data import build_dataset
from ddpmlab.data.audio_mel import (
    MelImageDataset,
    denormalise,
    log_mel_of_image,
    mel_frames,
    mel_image,
    normalise,
)
from ddpmlab.data.mel import config_mel
from ddpmlab.data.spoken_digits import HELD_OUT, TRAIN, write_spoken_digits
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DDPMError
from ddpmlab.evaluate.mel_sound import check_vocoder_fits, griffin_lim_sound, vocoded_sound
from ddpmlab.evaluate.run import EvalContext, EvalSettings
from ddpmlab.evaluate.speech_classifier import digit_order, load_speech_classifier, probabilities, sound_reference
from ddpmlab.io.sound import read_wav
from ddpmlab.models import build_model
from ddpmlab.models.conditioned import mel_condition
from ddpmlab.runs import Run, SamplingRequest, draw_samples, load_run, plan_request

pytest.importorskip("espeakng_loader")

# the bundled recipe shrunk to seconds: 16 bands x 64 frames, a two-level UNet of 16 channels
TINY_MEL = ["data.n_mels=16", "unet.base_channels=16", "unet.norm_groups=8", "unet.channel_mults=[1,2]",
            "unet.attention_resolutions=[]"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """4 training and 4 held-out clips a digit, of a seed neither the classifier (1) nor the default (0) uses."""
    return write_spoken_digits(tmp_path_factory.mktemp("sd") / "digits", n_per_digit=4, seed=5, progress=False)


def mel_config(digits, *overrides):
    return load_config("spoken_digits_mel", [f"data.path={digits / TRAIN}", *overrides])


def train_args(digits, out, name, steps):
    return ["train", "--config", "spoken_digits_mel", f"data.path={digits / TRAIN}", *TINY_MEL, "train.minutes=null",
            f"train.steps={steps}", "train.batch_size=4", "train.warmup_steps=2", "train.ema_start=1",
            "train.save_every=2", "train.log_every=1", "train.sample_n=2", "train.sample_steps=2",
            "train.tensorboard=false", "train.device=cpu", f"train.out_dir={out}", f"train.name={name}",
            "--no-progress"]


def test_normalise_and_denormalise_invert_each_other_inside_the_range_and_clip_outside():
    lo, hi = -10.0, 2.0
    inside = torch.linspace(lo, hi, 1001, dtype=torch.float64)
    image = normalise(inside, [lo, hi])
    assert image[0] == -1 and image[-1] == 1 and image[500].abs() < 1e-12  # lo -> -1, hi -> 1, the middle -> 0
    assert torch.allclose(denormalise(image, [lo, hi]), inside, atol=1e-12, rtol=0)
    outside = torch.tensor([-30.0, lo - 1e-3, hi + 1e-3, 9.0], dtype=torch.float64)
    assert normalise(outside, [lo, hi]).tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert denormalise(normalise(outside, [lo, hi]), [lo, hi]).tolist() == [lo, lo, hi, hi]
    assert denormalise(torch.tensor([-3.0, 5.0]), [lo, hi]).tolist() == [lo, hi]  # a drawn image is clipped first


def test_the_mel_image_of_a_clip_is_librosas_log_mel_mapped_by_the_fixed_range(digits):
    librosa = pytest.importorskip("librosa")
    cfg = mel_config(digits)
    d = cfg.data
    speech = build_dataset(cfg).sound.clip(0)[0]
    tone = 8 * torch.sin(2 * torch.pi * 440 * torch.arange(16000) / 16000)  # over full scale: above the range
    x = torch.stack([speech, tone, torch.zeros(16000)])[:, None]  # silence: below its bottom
    image = mel_image(x, cfg)
    assert image.shape == (3, 1, 32, 64) and mel_frames(d) == 63
    ref = librosa.feature.melspectrogram(y=x[:, 0].double().numpy(), sr=16000, n_fft=d.n_fft, hop_length=d.hop_length,
                                         power=1.0, n_mels=d.n_mels, fmin=d.f_min, fmax=d.f_max, center=True,
                                         pad_mode="constant", htk=False, norm="slaney")
    lo, hi = d.mel_range
    ref = np.clip(2 * (np.log(np.maximum(ref, 1e-5)) - lo) / (hi - lo) - 1, -1, 1)
    assert np.abs(image[:, 0, :, :63].numpy() - ref).max() < 1e-6
    assert (image[..., 63:] == -1).all() and image[1].max() == 1 and (image[2] == -1).all()  # padding, clipping
    logs = log_mel_of_image(image, d)  # the padding cut; ln(mel) again inside the range
    assert logs.shape == (3, 1, 32, 63)
    assert torch.allclose(logs[0], config_mel(x[0], d).clamp(lo, hi), atol=1e-5)


def test_a_mel_folder_is_its_clips_images_and_refused_settings_are_one_line(digits):
    cfg = mel_config(digits)
    ds = build_dataset(cfg)
    assert isinstance(ds, MelImageDataset) and ds.is_image and ds.is_audio and ds.sample_shape == (1, 32, 64)
    assert len(ds) == 40 and ds.num_classes == 10 and torch.equal(ds.y, ds.sound.labels)
    assert torch.equal(ds[7][0], mel_image(ds.sound.clip(7), cfg)) and ds.x.abs().max() <= 1


@pytest.mark.parametrize("overrides,message", [
    (["data.n_mels=30"], r"data.n_mels=30 must be a multiple of 4: the UNet halves the mel image 2 times"),
    (["model.kind=diffwave"], "data.representation=mel makes each clip a log-mel image for model.kind=unet"),
    (["data.representation=spectrum"], "data.representation='spectrum': sound .* is read as one of wave, mel"),
    (["data.mel_range=[2,-10]"], r"data.mel_range must be \[low, high\] with low < high"),
    (["model.condition=mel"], "model.condition=mel does not go with data.representation=mel"),
    (["data.representation=wave"], "data.representation=mel makes each clip an image for a UNet"),
    (["data.representation=wave", "data.vocoder=v", "model.kind=diffwave"], "data.vocoder=v makes sound of"),
])
def test_mel_settings_that_do_not_fit_are_refused_in_one_line(digits, overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        mel_config(digits, *overrides)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="data.representation='mel': sound"):
        load_config("mnist", ["data.representation=mel"])


def test_griffin_lim_of_real_held_out_clips_through_the_mel_images_is_still_recognised(digits, one_thread):
    """This route's ceiling: what the classifier hears of real clips made images and inverted (>= 0.8 here; the
    benchmark measures it on the whole held-out split)."""
    cfg = mel_config(digits)
    held = sound_reference(Run(cfg, torch.nn.Identity(), NoiseSchedule.from_config(cfg.diffusion), "cpu"))
    sound = griffin_lim_sound(mel_image(held.clips, cfg), cfg.data, seed=0)
    assert sound.shape == held.clips.shape and sound.abs().max() <= 1
    truth = torch.tensor(digit_order(held.class_names))[held.labels]
    acc = float((probabilities(load_speech_classifier(), sound).argmax(1) == truth).float().mean())
    assert acc >= 0.8, acc


def tiny_vocoder(cfg, **data) -> Run:
    vcfg = load_config("vocoder", [f"data.path={cfg.data.path}", "diffwave.preset=null", "diffwave.layers=2",
                                   "diffwave.channels=4", "diffwave.dilation_cycle=2",
                                   *[f"data.{k}={v}" for k, v in data.items()]])
    torch.manual_seed(0)
    return Run(vcfg, build_model(vcfg).eval(), NoiseSchedule.from_config(vcfg.diffusion), torch.device("cpu"))


def test_a_vocoder_makes_the_sound_of_a_mel_image_as_ddpm_vocode_does_of_its_clip(digits, one_thread):
    cfg = mel_config(digits)
    clip = build_dataset(cfg).sound.clip(3)[None]
    d = cfg.data
    with pytest.raises(DDPMError, match=r"its mel spectrogram is not this run's \(data.n_fft 512 vs 1024; "
                                        r"data.n_mels 32 vs 80; data.f_max 8000.0 vs None\)"):
        check_vocoder_fits(Run(cfg, torch.nn.Identity(), NoiseSchedule.from_config(cfg.diffusion), "cpu"),
                           tiny_vocoder(cfg))
    vocoder = tiny_vocoder(cfg, n_fft=d.n_fft, n_mels=d.n_mels, f_max=d.f_max)
    made = vocoded_sound(mel_image(clip, cfg), d, vocoder, seed=4)
    lo, hi = d.mel_range  # ddpm vocode's way: the clip's own log-mel (within the image's range) as the condition
    cond = mel_condition(clip, d).clamp(lo, hi)
    plan = plan_request(vocoder, SamplingRequest(n=1, cond=cond, seed=4, cycle_classes=False), log=lambda m: None)
    direct = draw_samples(vocoder, plan, progress=False)
    assert made.shape == (1, 1, 16000) and torch.allclose(made, direct.clamp(-1, 1), atol=1e-3)


def test_a_mel_run_resumes_bit_identically_writes_wavs_of_its_images_and_is_scored_end_to_end(
        digits, tmp_path, one_thread, capsys):
    from safetensors.torch import load_file

    from ddpmlab.cli import main

    assert main(train_args(digits, tmp_path, "straight", 4)) == 0
    assert "as log-mel images 1x16x64" in capsys.readouterr().out
    assert main(train_args(digits, tmp_path, "stopped", 2)) == 0
    assert main(["train", "--resume", str(tmp_path / "stopped"), "train.steps=4", "--no-progress"]) == 0
    for part in ("model", "ema", "optimizer"):
        a, b = (load_file(tmp_path / run / "checkpoints/step_0000004" / f"{part}.safetensors")
                for run in ("straight", "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{part} differs after resume"
    final = tmp_path / "straight" / "samples"  # training's drawing: the picture and the sounds
    assert (final / "final.png").is_file() and len(list((final / "final").glob("*.wav"))) == 2
    run_dir, out = tmp_path / "straight", tmp_path / "out"
    assert main(["sample", str(run_dir), "--n", "3", "--steps", "2", "--class", "seven", "--out", str(out), "--npz",
                 "--no-progress"]) == 0
    images = torch.from_numpy(np.load(out / "samples.npz")["samples"])
    assert images.shape == (3, 1, 16, 64) and images.abs().max() <= 1  # the raw samples: the mel images
    sounds = [read_wav(out / f"{i:06d}.wav") for i in range(3)]
    assert all(rate == 16000 and x.shape == (1, 16000) for x, rate in sounds)
    run = load_run(run_dir, device="cpu")
    expected = griffin_lim_sound(images, run.cfg.data, seed=0)  # the WAVs are the images' Griffin-Lim, 16-bit
    assert max(float((x - e).abs().max()) for (x, _), e in zip(sounds, expected)) <= 1 / 32768 + 1e-6
    capsys.readouterr()
    assert main(["sample", str(run_dir), "--n", "1", "--vocoder", str(tmp_path / "nothing"), "--no-progress"]) != 0
    err = capsys.readouterr().err.strip()
    assert "is not a run folder; give a vocoder run" in err and "\n" not in err

    assert main(["eval", str(run_dir), "--n", "10", "--steps", "2", "--metrics", "acc", "--no-progress",
                 "--out", str(tmp_path / "eval.json")]) == 0
    res = json.loads((tmp_path / "eval.json").read_text())
    settings = EvalSettings(n=10, steps=2, metrics=["acc"])
    ctx = EvalContext(run.cfg, run.model, run.schedule, sound_reference(run), settings, "cpu", progress=False,
                      use_cache=False, run=run)
    waves = griffin_lim_sound(draw_samples(run, ctx.plan, 10, seed=0, progress=False), run.cfg.data, seed=0)
    truth = torch.tensor(digit_order(run.class_names))[ctx.plan.labels]
    acc = float((probabilities(load_speech_classifier(), waves).argmax(1) == truth).float().mean())
    assert torch.equal(ctx.samples[0], waves) and waves.shape == (10, 1, 16000)  # eval's samples: the images' sound
    assert res["metrics"]["acc"] == pytest.approx(acc, abs=1e-9)
    assert res["data_baseline"]["acc"] >= 0.7  # real held-out clips beside them
    assert sound_reference(run).root == str(digits / HELD_OUT)
