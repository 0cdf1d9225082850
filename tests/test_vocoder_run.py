"""A vocoder run end to end: its config, training on the one loop (resumed bit for bit) and `ddpm vocode`."""

import math

import pytest
import torch

from ddpmlab.config import Config, config_from_dict, validate
from ddpmlab.data.audio import random_segments
from ddpmlab.data.mel import config_mel
from ddpmlab.errors import ConfigError
from ddpmlab.io.sound import read_wav, write_wav
from ddpmlab.models import build_model
from ddpmlab.models.conditioned import mel_condition


def vocoder_config(path, **keys) -> Config:
    cfg = config_from_dict({"data": {"dataset": "audio", "path": str(path), "channels": 1, "length": 4096},
                            "model": {"kind": "diffwave", "condition": "mel"}, "diffwave": {"preset": "small"}})
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("keys,message", [
    ({"data__dataset": "mnist", "model__kind": "unet"}, "model.condition=mel is a vocoder's"),
    ({"data__hop_length": 200}, "diffwave.upsample [16, 16] upsamples the mel frames 256-fold"),
    ({"train__cond_noise": 0.1}, "a vocoder (model.condition=mel) takes its mel spectrogram clean"),
    ({"model__condition": "low_res"}, "sound (data.dataset=audio) takes model.condition=none, or mel"),
    ({"data__crop": 5000}, "at most data.length=4096"),
    ({"data__crop": 1024, "model__condition": "none"}, "other runs take null"),
    ({"data__crop": 1024, "data__dataset": "mnist", "model__kind": "unet", "model__condition": "none",
      "diffwave__preset": None}, "data.crop=1024 trains a vocoder"),
])
def test_vocoder_config_errors_are_one_line(tmp_path, keys, message):
    cfg = vocoder_config(tmp_path, **keys)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        validate(cfg)
    assert "\n" not in str(e.value)


def test_a_vocoder_config_builds_diffwave_with_the_mel_of_each_channel(tmp_path):
    cfg = vocoder_config(tmp_path, data__channels=2, data__n_mels=20)
    validate(cfg)
    net = build_model(cfg)
    assert net.mel_channels == 40
    x = torch.randn(2, 2, 4096)
    mel = mel_condition(x, cfg.data)
    assert mel.shape == (2, 40, 1 + 4096 // 256)
    assert torch.equal(mel[:, 20:], config_mel(x[:, 1], cfg.data))  # the second channel's bands below the first's
    assert net(x, torch.tensor([1, 2]), cond=mel).shape == (2, 2, 4096)


def test_random_segments_are_contiguous_slices_at_offsets_drawn_from_the_generator():
    x = torch.arange(3 * 2 * 100, dtype=torch.float32).reshape(3, 2, 100)
    seg = random_segments(x, 30, torch.Generator().manual_seed(1))
    assert seg.shape == (3, 2, 30)
    for row, s in zip(x, seg):
        start = int(s[0, 0] - row[0, 0])
        assert torch.equal(s, row[:, start:start + 30])  # both channels cut at the same place
    assert torch.equal(seg, random_segments(x, 30, torch.Generator().manual_seed(1)))
    starts = {int(random_segments(x, 30, torch.Generator().manual_seed(k))[0, 0, 0]) for k in range(300)}
    assert min(starts) == 0 and max(starts) == 70  # every offset in [0, n - length] can come
    assert random_segments(x, 100, torch.Generator()) is x


# ------------------------------------------------------------------------------ a vocoder run
def tiny_vocoder_run(folder, out, name, steps):
    """configs/vocoder.yaml shrunk to seconds: a 4-layer DiffWave on 1024-sample chirps at 8 kHz, 20 mel bands."""
    return ["train", "--config", "vocoder", f"data.path={folder}", "data.sample_rate=8000", "data.length=1024",
            "data.n_fft=256", "data.hop_length=64", "data.crop=512", "data.n_mels=20", "diffwave.upsample=[8,8]",
            "diffwave.preset=null", "diffwave.layers=4", "diffwave.channels=8", "diffwave.dilation_cycle=2",
            "diffwave.embed_dim=32", "train.minutes=null", f"train.steps={steps}", "train.batch_size=4",
            "train.warmup_steps=2", "train.ema_start=1", "train.save_every=3", "train.log_every=1",
            "train.sample_n=2", "train.tensorboard=false", "train.device=cpu", f"train.out_dir={out}",
            f"train.name={name}", "--no-progress"]


def chirps(folder, n=4, rate=8000, length=1024):
    folder.mkdir(parents=True)
    t = torch.arange(length, dtype=torch.float64) / rate
    for k in range(n):
        write_wav(folder / f"{k}.wav", 0.4 * torch.sin(2 * math.pi * ((200 + 150 * k) * t + 900 * t**2)), rate)


def test_a_vocoder_run_resumes_bit_identically_and_vocodes_a_recording(tmp_path, one_thread, capsys, straight_run):
    from safetensors.torch import load_file

    from ddpmlab.cli import main

    chirps(tmp_path / "chirps")
    assert main(tiny_vocoder_run(tmp_path / "chirps", tmp_path, "straight", 6)) == 0
    assert main(tiny_vocoder_run(tmp_path / "chirps", tmp_path, "stopped", 3)) == 0
    assert main(["train", "--resume", str(tmp_path / "stopped"), "train.steps=6", "--no-progress"]) == 0
    end = "checkpoints/step_0000006"
    for part in ("model", "ema", "optimizer"):
        a, b = (load_file(tmp_path / run / end / f"{part}.safetensors") for run in ("straight", "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{part} differs after resume"
    assert "ddpm vocode" in capsys.readouterr().out  # the next command of a vocoder
    assert sorted(p.name for p in (tmp_path / "straight" / "samples" / "final").iterdir()) == ["000000.wav",
                                                                                                "000001.wav"]
    run = tmp_path / "straight"
    speech = tmp_path / "in.wav"  # 16 kHz into an 8 kHz run: resampled with a note
    write_wav(speech, 0.4 * torch.sin(2 * math.pi * 300 * torch.arange(3000, dtype=torch.float64) / 16000), 16000)
    assert main(["vocode", str(run), "--audio", str(speech), "--out", str(tmp_path / "re.wav"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "resampled from 16000 Hz to the run's 8000 Hz" in err
    assert "sampler: diffwave_fast, 6 steps" in out and "griffin_lim" in out and "MR-STFT" in out
    for name in ("re.wav", "re_griffin_lim.wav"):
        x, rate = read_wav(tmp_path / name)
        assert rate == 8000 and x.shape == (1, 1500) and x.abs().max() <= 1
    for command, message in (
            (["sample", str(run)], "is a vocoder (model.condition=mel)"),
            (["vocode", str(straight_run), "--audio", str(speech)], "is an image run"),
            (["vocode", str(run), "--audio", str(tmp_path / "chirps")], "is not readable sound")):
        assert main(command) != 0
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
