"""The bundled spoken-digit set: eSpeak NG through ctypes, the folder it writes, bit-for-bit reproducible."""

import json
import sys
import warnings

import numpy as np
import pytest
import soundfile

from ddpmlab.data.audio import AudioFolderDataset
from ddpmlab.data.spoken_digits import (
    ABOUT_FILE,
    DIGITS,
    HELD_OUT,
    HELD_OUT_VARIANTS,
    LENGTH,
    PEAK_DB,
    SAMPLE_RATE,
    TRAIN,
    TRAIN_VARIANTS,
    ESpeak,
    Utterance,
    finish_clip,
    held_out_folder,
    trim_silence,
    write_spoken_digits,
)
from ddpmlab.errors import DataError

pytest.importorskip("espeakng_loader")


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_spoken_digits(tmp_path_factory.mktemp("sd") / "digits", n_per_digit=2, seed=5, progress=False)


def test_the_same_seed_writes_the_same_files_bit_for_bit_and_another_seed_others(digits, tmp_path):
    again = write_spoken_digits(tmp_path / "again", n_per_digit=2, seed=5, progress=False)
    first, second = files_of(digits), files_of(again)
    assert len(first) == 1 + 20 + 100 and first == second  # the json, 2 training and 10 held-out clips a digit
    other = files_of(write_spoken_digits(tmp_path / "other", n_per_digit=2, seed=6, progress=False))
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first if k.endswith(".wav")) == 120  # every clip differs


def test_the_training_split_reads_as_ten_classes_of_one_second_clips_at_16_khz(digits):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no clip resampled, padded or skipped
        train = AudioFolderDataset(digits / TRAIN)
    assert train.class_names == sorted(DIGITS) and len(train) == 20 and not train.skipped
    assert train.clips.shape == (20, 1, LENGTH) and train.labels.bincount().tolist() == [2] * 10
    info = soundfile.info(str(digits / TRAIN / "seven" / "00001.wav"))
    assert (info.samplerate, info.frames, info.channels, info.subtype) == (SAMPLE_RATE, LENGTH, 1, "PCM_16")
    peaks = train.clips.abs().amax(dim=(1, 2))  # the drawn peak level, plus noise at least 20 dB below the word
    assert peaks.min() > 10 ** (PEAK_DB[0] / 20) * 0.8 and peaks.max() < 10 ** (PEAK_DB[1] / 20) * 1.3
    held = AudioFolderDataset(held_out_folder(digits / TRAIN))
    assert held.class_names == train.class_names and len(held) == 100


def test_the_description_names_disjoint_voices_for_the_two_splits(digits):
    about = json.loads((digits / ABOUT_FILE).read_text())
    splits = about["splits"]
    assert splits[TRAIN]["variants"] == list(TRAIN_VARIANTS) and splits[HELD_OUT]["variants"] == list(HELD_OUT_VARIANTS)
    assert not set(TRAIN_VARIANTS) & set(HELD_OUT_VARIANTS)
    assert about["seed"] == 5 and about["synthesiser"].startswith("eSpeak NG 1.")
    assert (splits[TRAIN]["per_digit"], splits[HELD_OUT]["per_digit"]) == (2, 10)
    assert held_out_folder(digits) is None and held_out_folder(digits / HELD_OUT) is None  # only beside train/


def f0(x: np.ndarray, rate: int) -> float:
    """The fundamental frequency of the loudest 50 ms of x: the autocorrelation's peak between 60 and 500 Hz."""
    w = int(0.05 * rate)
    start = int(np.argmax(np.convolve(x ** 2, np.ones(w), "valid")))
    seg = x[start:start + w] - x[start:start + w].mean()
    ac = np.correlate(seg, seg, "full")[w - 1:]
    lo, hi = rate // 500, rate // 60
    return rate / (lo + int(np.argmax(ac[lo:hi])))


def test_espeak_speaks_slower_at_a_lower_rate_and_higher_at_a_higher_pitch():
    engine = ESpeak()
    say = lambda **k: engine.say(Utterance(**{"text": "nine.", "voice": "en-us+m3", "rate": 175, "pitch": 50,  # noqa
                                              "pitch_range": 0, "seed": 1, **k})) / 32768.0
    slow, fast = (len(trim_silence(say(rate=r), frame=engine.rate // 100)) for r in (120, 240))
    assert 1.5 < slow / fast < 2.5  # eSpeak's rate is words per minute: half the rate, about twice as long
    low, high = f0(say(pitch=20), engine.rate), f0(say(pitch=80), engine.rate)
    assert 1.3 < high / low < 3.0  # pitch 0-99 spans about two octaves; a monotone voice (range 0) at each
    with pytest.raises(DataError, match="no voice 'xx-nobody'"):
        engine.say(Utterance("one", "xx-nobody", 175, 50, 50, 1))


def test_a_clip_is_placed_at_its_level_and_onset_with_noise_at_its_snr():
    word = np.sin(np.arange(4000) * 0.3)
    clean = finish_clip(word, peak_db=-6.0, snr_db=300.0, onset=0.5, noise_seed=7)
    start = (LENGTH - 4000) // 2  # half the room before the word
    assert len(clean) == LENGTH and abs(np.abs(clean).max() - 10 ** (-6 / 20)) < 1e-12
    assert np.abs(clean[:start]).max() < 1e-12 and np.abs(clean[start + 4000:]).max() < 1e-12
    assert np.allclose(clean[start:start + 4000], word * 10 ** (-6 / 20) / np.abs(word).max())
    noisy = finish_clip(word, peak_db=-6.0, snr_db=30.0, onset=0.5, noise_seed=7)
    level = np.sqrt((clean[start:start + 4000] ** 2).mean())
    snr = 20 * np.log10(level / np.sqrt(((noisy - clean) ** 2).mean()))
    assert abs(snr - 30.0) < 0.2
    assert len(trim_silence(noisy)) == LENGTH  # noise 30 dB down is above the -40 dB floor: nothing trimmed
    quiet = finish_clip(word, peak_db=-6.0, snr_db=50.0, onset=0.5, noise_seed=7)
    assert 4000 <= len(trim_silence(quiet)) <= 4000 + 2 * SAMPLE_RATE // 100  # 50 dB down: cut to the word's frames


def test_bad_targets_and_a_missing_espeak_are_one_line_errors(digits, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="already exists"):
        write_spoken_digits(digits, n_per_digit=1, progress=False)
    with pytest.raises(DataError, match="does not exist; create it first"):
        write_spoken_digits(tmp_path / "no" / "such", n_per_digit=1, progress=False)
    with pytest.raises(DataError, match="--n-per-digit must be at least 1"):
        write_spoken_digits(tmp_path / "none", n_per_digit=0, progress=False)
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)  # import fails
    with pytest.raises(DataError, match="pip install espeakng-loader"):
        write_spoken_digits(tmp_path / "quiet", n_per_digit=1, progress=False)
    assert not (tmp_path / "quiet").exists() and not list(tmp_path.glob(".quiet*"))


def test_ddpm_data_spoken_digits_writes_the_folder_and_says_how_to_train(tmp_path, capsys):
    from ddpmlab.cli import main

    assert main(["data", "spoken-digits", str(tmp_path / "sd"), "--n-per-digit", "1", "--seed", "2",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "10 training clips" in out and "100 held-out clips" in out
    assert f"ddpm train --config spoken_digits data.path={tmp_path / 'sd' / TRAIN}" in out
    assert sorted(p.name for p in (tmp_path / "sd").iterdir()) == sorted([ABOUT_FILE, HELD_OUT, TRAIN])
