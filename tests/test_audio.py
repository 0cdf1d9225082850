"""Sound: WAV files, resampling, sound folders, mel spectrograms (librosa as the oracle) and DiffWave."""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import soundfile
import torch
from _util import perturb

from ddpmlab.config import Config, config_from_dict, validate
from ddpmlab.data import build_dataset, data_shape
from ddpmlab.data.audio import AudioFolderDataset
from ddpmlab.data.mel import log_mel, mel_filter_bank, mel_spectrogram
from ddpmlab.data.resample import resample
from ddpmlab.diffusion.analytic import ExactDenoiser, Gaussian
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, DataError
from ddpmlab.io.sound import read_wav, save_wavs, to_pcm16, write_wav
from ddpmlab.models import build_model, count_parameters
from ddpmlab.models.diffwave import DiffWave, receptive_field
from ddpmlab.samplers.generate import generate

librosa = pytest.importorskip("librosa")  # the test extra's oracle of the mel spectrogram


def tone(freq: float, rate: int, n: int, amplitude: float = 0.5, phase: float = 0.3) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate + phase)


# ------------------------------------------------------------------------------------------- WAV files
def test_a_16_bit_wav_round_trip_is_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3000, generator=g) * 2.4 - 1.2  # beyond full scale too: clamped
    x[0, 5] = float("nan")
    first = write_wav(tmp_path / "a.wav", x, 16000)
    stored, rate = soundfile.read(first, dtype="int16", always_2d=True)
    assert rate == 16000 and np.array_equal(stored, to_pcm16(x))
    assert stored[5, 0] == 0 and stored.max() == 32767 and stored.min() == -32768
    y, rate = read_wav(first)
    assert rate == 16000 and torch.equal(y, torch.from_numpy(stored.T / 32768.0).float())
    second = write_wav(tmp_path / "b.wav", y, rate)  # read and written again: the same file, byte for byte
    assert first.read_bytes() == second.read_bytes()
    assert torch.equal(read_wav(second)[0], y)  # and q / 32768 survives a write and a read exactly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.wav", "b.wav"]  # no temporary file left


def test_samples_are_written_one_wav_each(tmp_path):
    x = torch.from_numpy(np.stack([tone(440, 8000, 800), tone(880, 8000, 800)])[:, None]).float()
    files = save_wavs(x, tmp_path / "out", 8000)
    assert [f.name for f in files] == ["000000.wav", "000001.wav"]
    back = torch.stack([read_wav(f)[0] for f in files])
    assert back.shape == (2, 1, 800) and (back - x).abs().max() <= 0.5 / 32768


# ----------------------------------------------------------------------------------------- resampling
@pytest.mark.parametrize("orig,new", [(44100, 16000), (8000, 16000), (16000, 22050), (48000, 16000)])
def test_resampling_reproduces_band_limited_tones_and_agrees_with_scipy(orig, new):
    from scipy.signal import resample_poly

    freq = 0.6 * min(orig, new) / 2  # inside the pass band of both rates
    x = torch.from_numpy(tone(freq, orig, orig // 4))
    y = resample(x, orig, new)
    assert len(y) == math.ceil(len(x) * new / orig)
    inner = slice(len(y) // 10, -len(y) // 10)  # away from the ends, where the signal is cut
    truth = torch.from_numpy(tone(freq, new, len(y)))
    assert (y - truth)[inner].abs().max() < 1e-3  # the analytic truth: the same tone sampled at the new rate
    g = math.gcd(orig, new)
    reference = torch.from_numpy(resample_poly(x.numpy(), new // g, orig // g))[: len(y)]
    assert (y - reference)[inner].abs().max() < 3e-3


def test_resampling_down_removes_tones_above_the_new_nyquist_frequency():
    x = torch.from_numpy(tone(12000, 44100, 44100))  # above 8 kHz: would alias to 4 kHz
    y = resample(x, 44100, 16000)
    assert y[1000:-1000].abs().max() < 1e-3 and torch.equal(resample(x, 16000, 16000), x)


# ---------------------------------------------------------------------------------------- sound folders
@pytest.fixture
def sound_zoo(tmp_path):
    """Two classes of tones: good WAV, FLAC and OGG files, another rate, a short clip, a stereo file, and
    files that are no sound (text named .wav, a cut header, an empty recording, an AIFF named .wav)."""
    root = tmp_path / "sounds"
    for name in ("high", "low"):
        (root / name).mkdir(parents=True)
    write = lambda path, x, rate, **kw: soundfile.write(str(root / path), x, rate, **kw)  # noqa: E731
    write("high/a.wav", tone(2000, 16000, 16000), 16000, subtype="PCM_16")
    write("high/b.flac", tone(2500, 16000, 20000), 16000)
    write("high/c.ogg", tone(1500, 16000, 16000), 16000)
    write("low/d.wav", tone(300, 8000, 8000), 8000, subtype="PCM_16")  # 1 s at 8 kHz: resampled
    write("low/e.wav", tone(200, 16000, 4000), 16000, subtype="FLOAT")  # a quarter second: padded
    write("low/f.wav", np.stack([tone(250, 16000, 16000), -tone(250, 16000, 16000)], axis=1), 16000)
    (root / "low" / "notes.wav").write_text("not a sound")
    (root / "low" / "cut.wav").write_bytes((root / "high" / "a.wav").read_bytes()[:30])
    write("low/empty.wav", np.zeros((0, 1)), 16000)
    write("low/aiff.wav", tone(200, 16000, 100), 16000, format="AIFF")
    (root / "low" / "readme.txt").write_text("ignored: not a sound extension")
    return root


def test_a_sound_folder_gives_labelled_clips_skipping_what_is_no_sound_with_reasons(sound_zoo):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = AudioFolderDataset(sound_zoo, sample_rate=16000, length=12000, channels=1)
    assert ds.class_names == ["high", "low"] and len(ds) == 6 and ds.sample_shape == (1, 12000)
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    reasons = {p.split("/")[-1]: r for p, r in ds.skipped}
    assert sorted(reasons) == ["aiff.wav", "cut.wav", "empty.wav", "notes.wav"]
    assert "AIFF" in reasons["aiff.wav"] and "empty" in reasons["empty.wav"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3 and "skipped 4 of 10 sound files" in messages[0]
    assert messages[1].startswith("data.sample_rate: 1 of 6 clips") and "(8000 Hz)" in messages[1]
    assert messages[2].startswith("data.length: 1 of 6 clips") and "padded with silence" in messages[2]
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 12000) and y.item() == 0 and x.abs().max() <= 1
    assert (x[0] - torch.from_numpy(tone(2000, 16000, 12000))).abs().max() < 1e-4  # 16-bit steps only
    resampled = ds[3][0][0]  # 1 s of 300 Hz at 8 kHz: 16000 samples at 16 kHz, cut to 12000
    assert (resampled[2000:] - torch.from_numpy(tone(300, 16000, 12000))[2000:]).abs().max() < 1e-3
    padded = ds[4][0][0]
    assert padded[4000:].abs().max() == 0 and padded[:4000].abs().max() > 0.4
    assert ds[5][0].abs().max() < 1e-4  # a stereo file whose channels cancel: their mean (16-bit steps)


def test_stereo_clips_keep_two_channels_and_mono_is_doubled(sound_zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = AudioFolderDataset(sound_zoo, sample_rate=16000, length=4000, channels=2)
    assert ds.sample_shape == (2, 4000)
    assert torch.equal(ds[0][0][0], ds[0][0][1])  # a mono file on both channels
    assert torch.allclose(ds[5][0][0], -ds[5][0][1], atol=1e-4) and ds[5][0].abs().max() > 0.4


def test_folders_without_usable_sound_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"contains no sound files .*\.wav, \.flac, \.ogg") as e:
        AudioFolderDataset(tmp_path / "empty")
    assert "\n" not in str(e.value)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_text("not a sound")
    with pytest.raises(DataError, match="none of the 1 sound files") as e:
        AudioFolderDataset(tmp_path / "bad")
    assert "\n" not in str(e.value) and len(e.value.skipped) == 1


# -------------------------------------------------------------------------------------- mel spectrograms
@pytest.mark.parametrize("rate,n_fft,n_mels,f_min,f_max", [(16000, 1024, 80, 0.0, None), (22050, 1024, 80, 20.0, 8000.0),
                                                           (16000, 512, 40, 50.0, 7600.0), (8000, 256, 128, 0.0, None)])
def test_the_mel_filter_bank_equals_librosas(rate, n_fft, n_mels, f_min, f_max):
    ours = mel_filter_bank(rate, n_fft, n_mels, f_min, f_max, dtype=torch.float64)
    theirs = librosa.filters.mel(sr=rate, n_fft=n_fft, n_mels=n_mels, fmin=f_min, fmax=f_max, dtype=np.float64)
    assert ours.shape == theirs.shape and np.abs(ours.numpy() - theirs).max() < 1e-5 * np.abs(theirs).max()


@pytest.mark.parametrize("hop,power", [(256, 1.0), (160, 2.0)])
def test_the_log_mel_spectrogram_equals_librosas(hop, power):
    x = np.random.default_rng(0).standard_normal(5003) * 0.3 + tone(440, 16000, 5003)
    theirs = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=1024, hop_length=hop, n_mels=80, fmin=20.0,
                                            power=power, dtype=np.float64)  # its filter bank in float64 too
    ours = mel_spectrogram(torch.from_numpy(x)[None, None], 16000, 1024, hop, 80, 20.0, power=power)[0, 0]
    assert ours.shape == theirs.shape == (80, 1 + 5003 // hop)
    assert np.abs(ours.numpy() - theirs).max() < 1e-5
    assert np.abs(log_mel(ours).numpy() - np.log(np.maximum(theirs, 1e-5))).max() < 1e-5


# -------------------------------------------------------------------------------------------- config
def sound_config(path, **keys) -> Config:
    """A small DiffWave on the sound folder ``path``; ``keys`` (section__key=value) set after validation."""
    cfg = config_from_dict({"data": {"dataset": "audio", "path": str(path), "channels": 1, "length": 4096},
                            "model": {"kind": "diffwave"}, "diffwave": {"preset": "small"}})
    for key, value in keys.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


@pytest.mark.parametrize("keys,message", [
    ({"model__kind": "unet"}, "data.dataset=audio is sound: set model.kind=diffwave"),
    ({"data__dataset": "mnist"}, "model.kind=diffwave generates sound"),
    ({"data__channels": 3}, "'data.channels' must be 1 (mono) or 2 (stereo)"),
    ({"data__hop_length": 200}, "diffwave.upsample [16, 16] upsamples the mel frames 256-fold"),
    ({"diffwave__preset": "bsae"}, "did you mean 'base'?"),
    ({"diffwave__channels": 48}, "diffwave.preset=small sets"),
    ({"data__f_max": 9000.0}, "data.f_max <= data.sample_rate / 2 = 8000 Hz"),
    ({"train__eval_every": 10}, "train.eval_every's metrics"),
])
def test_sound_config_errors_name_the_key_and_validation_never_changes_the_config(tmp_path, keys, message):
    cfg = sound_config(tmp_path, **keys)
    before = dataclasses.asdict(cfg)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")) as e:
        validate(cfg)
    assert "\n" not in str(e.value) and dataclasses.asdict(cfg) == before
    good = sound_config(tmp_path)
    before = dataclasses.asdict(good)
    validate(good)
    assert dataclasses.asdict(good) == before and data_shape(good) == (1, 4096)


def test_diffwave_keys_on_an_image_model_are_refused():
    cfg = Config()
    cfg.diffwave.layers = 12
    with pytest.raises(ConfigError, match="diffwave.layers sizes DiffWave, but model.kind is 'unet'"):
        validate(cfg)


def test_build_dataset_reads_a_sound_folder(sound_zoo):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = build_dataset(sound_config(sound_zoo))
    assert isinstance(ds, AudioFolderDataset) and ds.sample_shape == (1, 4096) and ds.num_classes == 2


# --------------------------------------------------------------------------------------------- DiffWave
@pytest.mark.parametrize("layers,cycle", [(30, 10), (7, 3)])
def test_the_receptive_field_measured_by_the_gradient_equals_its_closed_form(one_thread, layers, cycle):
    """One output sample depends on exactly 1 + 2 sum_i 2^(i mod cycle) input samples (Kong et al.: 6139)."""
    net = perturb(DiffWave(1, layers=layers, channels=4, dilation_cycle=cycle, embed_dim=16), scale=0.3)
    field = receptive_field(layers, cycle)
    assert net.receptive_field == field and (layers != 30 or field == 6139)
    x = torch.randn(1, 1, 2 * field + 101, requires_grad=True)
    centre = x.shape[-1] // 2
    net(x, torch.tensor([7]))[0, 0, centre].backward()
    seen = torch.nonzero(x.grad[0, 0]).flatten()
    assert len(seen) == field and seen[0] == centre - (field - 1) // 2 and seen[-1] == centre + (field - 1) // 2


def test_with_the_label_dropped_diffwave_is_exactly_the_unconditional_network(one_thread):
    """The "no label" row is zero and gets no gradient, and the label maps have no bias: a dropped label adds
    nothing, before and after training."""
    torch.manual_seed(0)
    net = DiffWave(1, layers=6, channels=8, dilation_cycle=3, embed_dim=32, num_classes=3, label_dim=16)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):  # labels 0..2 and 3 ("no label") in training, as label dropout makes them
        x, target = torch.randn(8, 1, 64, generator=g), torch.randn(8, 1, 64, generator=g)
        y, t = torch.randint(0, 4, (8,), generator=g), torch.randint(0, 50, (8,), generator=g)
        loss = (net(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert net.label_embed.weight[3].abs().max() == 0 and net.output_proj.weight.abs().max() > 0
    plain = DiffWave(1, layers=6, channels=8, dilation_cycle=3, embed_dim=32)
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("label_embed") or ".label_proj." in k for k in unexpected)
    x, t = torch.randn(4, 1, 64, generator=g), torch.tensor([0, 5, 20, 49])
    with torch.no_grad():
        dropped, unconditional = net(x, t), plain(x, t)
        assert torch.equal(net(x, t, torch.full((4,), 3)), dropped)
        assert torch.equal(dropped, unconditional)
        assert (net(x, t, torch.zeros(4, dtype=torch.long)) - dropped).abs().max() > 1e-3  # a label is heard


def test_diffwave_shapes_and_its_conditions(one_thread, tmp_path):
    cfg = sound_config(tmp_path, data__channels=2, model__num_classes=4)
    net = build_model(cfg)
    assert isinstance(net, DiffWave) and (net.layers, net.dilation_cycle, len(net.skip_proj.weight)) == (12, 6, 32)
    x = torch.randn(3, 2, 1000)
    assert net(x, torch.tensor(5), torch.tensor([0, 1, 4])).shape == (3, 2, 1000)
    cfg.diffusion.variance, cfg.diffusion.loss_type = "learned_range", "hybrid"
    assert build_model(cfg)(x, torch.tensor([1, 2, 3])).shape == (3, 4, 1000)  # eps and the variance head
    vocoder = DiffWave(1, layers=4, channels=8, dilation_cycle=2, mel_channels=20, upsample=(4, 5))
    out = vocoder(torch.randn(2, 1, 1000), torch.tensor([3, 9]), cond=torch.randn(2, 20, 1 + 1000 // 20))
    assert out.shape == (2, 1, 1000)
    with pytest.raises(ValueError, match=r"cond must be \(B=2, 20, frames\) with frames \* 20 >= L=1000"):
        vocoder(torch.randn(2, 1, 1000), torch.tensor([3, 9]), cond=torch.randn(2, 20, 40))
    with pytest.raises(ValueError, match="built without model.num_classes"):
        vocoder(torch.randn(2, 1, 1000), torch.tensor([3, 9]), torch.tensor([0, 1]), cond=torch.randn(2, 20, 51))
    with pytest.raises(ValueError, match=r"DiffWave expects x of shape \(B, 2, L\)"):
        net(torch.randn(3, 1, 1000), torch.tensor(5))


def test_the_presets_have_the_papers_sizes(tmp_path):
    """Kong et al. 2021, Table 1: DiffWave BASE 2.64M and LARGE 6.91M parameters (80 mel bands, no labels)."""
    for preset, channels, paper in (("base", 64, 2.64e6), ("large", 128, 6.91e6)):
        net = build_model(sound_config(tmp_path, diffwave__preset=preset))
        assert (net.layers, net.dilation_cycle, len(net.skip_proj.weight)) == (30, 10, channels)
        vocoder = DiffWave(1, layers=30, channels=channels, dilation_cycle=10, mel_channels=80)
        assert abs(count_parameters(vocoder) / paper - 1) < 0.01


# ------------------------------------------------------------------------------- samplers on (B, C, L)
@pytest.mark.parametrize("sampler,steps", [("ddpm", 1000), ("ddim", 100), ("dpmpp_2m", 20), ("dpmpp_2m_sde", 30)])
def test_samplers_on_gaussian_sequences_reproduce_their_mean_and_covariance(one_thread, sampler, steps):
    """Sequences (1, 16) of a smooth Gaussian process, drawn through the exact eps* by the samplers as sound is."""
    i = torch.arange(16, dtype=torch.float64)
    cov = 0.25 * torch.exp(-(i[:, None] - i[None]) ** 2 / 18) + 0.01 * torch.eye(16)
    mean = 0.3 * torch.sin(i / 3)
    schedule = NoiseSchedule.make("linear", 1000)
    x = generate(ExactDenoiser(Gaussian(mean, cov), schedule), schedule, (1, 16), 4000, sampler=sampler,
                 steps=steps, clip_x0=None, batch_size=4000, device="cpu", progress=False)
    flat = x.reshape(4000, 16).double()
    assert x.shape == (4000, 1, 16)
    assert (flat.mean(0) - mean).abs().max() < 0.05 and (torch.cov(flat.T) - cov).abs().max() < 0.05


# ------------------------------------------------------------------------------------ an audio run
def tiny_audio_run(folder, out, name, steps):
    """The bundled audio_folder recipe shrunk to seconds: a 4-layer DiffWave on 1024-sample tones at 8 kHz."""
    return ["train", "--config", "audio_folder", f"data.path={folder}", "data.sample_rate=8000", "data.length=1024",
            "data.n_fft=256", "data.hop_length=64", "diffwave.upsample=[8,8]", "diffwave.preset=null",
            "diffwave.layers=4", "diffwave.channels=8", "diffwave.dilation_cycle=2", "diffwave.embed_dim=32",
            "diffwave.label_dim=8", "model.num_classes=2", "train.minutes=null", f"train.steps={steps}",
            "train.batch_size=4", "train.warmup_steps=2", "train.ema_start=1", "train.save_every=3",
            "train.log_every=1", "train.sample_n=2", "train.tensorboard=false", "train.device=cpu",
            "train.sample_guidance=2", f"train.out_dir={out}", f"train.name={name}", "--no-progress"]


def test_an_audio_run_trains_on_the_one_loop_resumes_bit_identically_and_samples_wav_files(tmp_path, one_thread,
                                                                                           capsys):
    from safetensors.torch import load_file

    from ddpmlab.cli import main

    for label, freq in (("low", 300.0), ("high", 1200.0)):
        (tmp_path / "tones" / label).mkdir(parents=True)
        for k in range(4):
            write_wav(tmp_path / "tones" / label / f"{k}.wav", tone(freq * (1 + k / 10), 8000, 1024), 8000)
    assert main(tiny_audio_run(tmp_path / "tones", tmp_path, "straight", 6)) == 0
    assert "data: 8 sound clips from" in capsys.readouterr().out
    assert main(tiny_audio_run(tmp_path / "tones", tmp_path, "stopped", 3)) == 0
    assert main(["train", "--resume", str(tmp_path / "stopped"), "train.steps=6", "--no-progress"]) == 0
    end = "checkpoints/step_0000006"
    for part in ("model", "ema", "optimizer"):
        a, b = (load_file(tmp_path / run / end / f"{part}.safetensors") for run in ("straight", "stopped"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{part} differs after resume"
    final = tmp_path / "straight" / "samples"  # training's drawing: a picture and the sounds, no image grid
    assert (final / "final.png").is_file() and sorted(p.name for p in (final / "final").iterdir()) == [
        "000000.wav", "000001.wav"]
    capsys.readouterr()
    assert main(["sample", str(tmp_path / "straight"), "--n", "3", "--steps", "10", "--class", "high",
                 "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "3 WAV files (000000.wav ...)" in capsys.readouterr().out
    sounds = [read_wav(tmp_path / "out" / f"{i:06d}.wav") for i in range(3)]
    assert all(rate == 8000 and x.shape == (1, 1024) and x.abs().max() <= 1 for x, rate in sounds)
    assert (tmp_path / "out" / "grid.png").is_file()
