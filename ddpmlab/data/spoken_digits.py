"""``ddpm data spoken-digits OUT``: the ten spoken digits, synthesised offline with eSpeak NG, in the spirit of SC09.

SC09 (the digits "zero" to "nine" of the Speech Commands set; Warden 2018) is the DiffWave paper's class-conditional
benchmark (Kong et al. 2021, Sec. 5.2).  This generator makes a set of the same form on the user's machine, nothing
downloaded: each clip is one digit word spoken by eSpeak NG (the library and its voice data come with the pip
package ``espeakng-loader``; driven here through ctypes, as ``speak_lib.h`` declares it) in a voice drawn from
English accents x voice variants, at a drawn speaking rate, pitch and pitch range, with a drawn final punctuation
(intonation), then

* resampled from eSpeak's 22050 Hz to 16 kHz (:mod:`ddpmlab.data.resample`), its leading and trailing silence cut;
* scaled to a drawn peak level (gain) and placed at a drawn onset in one second of silence (16000 samples, as SC09);
* given light white noise at a drawn signal-to-noise ratio, and stored as 16-bit PCM WAV.

The folder, written whole or not at all (built in a hidden temporary folder beside OUT, then renamed)::

    OUT/train/<digit>/00000.wav ...      the training split: data.dataset=audio data.path=OUT/train reads the ten
                                         sub-folders as classes (sorted names: eight, five, ..., zero)
    OUT/held_out/<digit>/00000.wav ...   the held-out split, spoken only by voice variants the training split never
                                         uses: the reference of ``ddpm eval`` on a run trained on OUT/train
    OUT/spoken_digits.json               what made it: seed, counts, voices, the ranges drawn from, eSpeak's version

The same seed writes the same files, bit for bit.  eSpeak keeps state from one utterance to the next (the phase of
its voice source), so every write synthesises all its utterances in order in a fresh process.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import soundfile
import torch

from ddpmlab.atomic import fsync_dir
from ddpmlab.data.resample import resample
from ddpmlab.errors import DataError
from ddpmlab.progress import progress_bar

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# eSpeak NG's English accents (espeak-ng-data/lang/gmw) and voice variants (espeak-ng-data/voices/!v)
ACCENTS = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan", "en-gb-x-gbcwmd")
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f5", "klatt", "klatt2", "klatt4", "croak",
                  "Andy", "Annie", "belinda", "david", "grandma", "iven2", "linda", "max", "steph", "travis")
HELD_OUT_VARIANTS = ("m6", "f4", "klatt3", "edward", "quincy", "shelby")
PUNCTUATION = (".", "!", "?", ",")  # the end of the utterance: its intonation
RATE_WPM = (130, 240)  # eSpeak's speaking rate, words per minute (its default 175)
PITCH = (25, 75)  # base pitch, 0-99 (default 50)
PITCH_RANGE = (20, 90)  # pitch range, 0-99 (default 50; 0 is monotone)
PEAK_DB = (-14.0, -2.0)  # the word's peak level, dB full scale
SNR_DB = (20.0, 40.0)  # white noise, dB below the word's RMS level
SAMPLE_RATE, LENGTH = 16000, 16000  # one second at 16 kHz, as SC09
SILENCE_DB = -40.0  # trimmed: the 10 ms frames at the ends quieter than this, relative to the loudest frame
TRAIN, HELD_OUT, ABOUT_FILE = "train", "held_out", "spoken_digits.json"
HELD_OUT_SHARE = 5  # held-out clips per digit: n_per_digit / this (at least MIN_HELD_OUT)
MIN_HELD_OUT = 10
RESAMPLE_CHUNK = 256  # clips resampled at once

# speak_lib.h
AUDIO_OUTPUT_SYNCHRONOUS, INITIALIZE_DONT_EXIT = 2, 0x8000
RATE, PITCH_PARAM, RANGE = 1, 3, 4  # espeak_PARAMETER
POS_CHARACTER, CHARS_UTF8 = 1, 1
_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


@dataclass(frozen=True)
class Utterance:
    """One call of eSpeak: the text, the voice ("accent+variant"), rate, pitch, pitch range, its noise seed."""

    text: str
    voice: str
    rate: int
    pitch: int
    pitch_range: int
    seed: int


def _library():
    try:
        import espeakng_loader  # imported when needed: `ddpm` itself runs without it
    except ImportError:
        raise DataError("spoken-digits: eSpeak NG is missing; install it with `pip install espeakng-loader`") from None
    return ctypes.CDLL(espeakng_loader.get_library_path()), espeakng_loader.get_data_path()


class ESpeak:
    """eSpeak NG in this process, synchronous: :meth:`say` returns an utterance's int16 samples at :attr:`rate`."""

    def __init__(self):
        lib, data = _library()
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_Info.restype = ctypes.c_char_p
        self.rate = lib.espeak_Initialize(AUDIO_OUTPUT_SYNCHRONOUS, 0, data.encode(), INITIALIZE_DONT_EXIT)
        if self.rate <= 0:
            raise DataError(f"spoken-digits: eSpeak NG did not start (data folder '{data}'); reinstall espeakng-loader")
        self.version = lib.espeak_Info(None).decode()
        self._chunks: List[np.ndarray] = []
        self._callback = _CALLBACK(self._collect)  # kept: eSpeak calls it for as long as it runs
        lib.espeak_SetSynthCallback(self._callback)
        self.lib = lib

    def _collect(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0  # 0: go on

    def say(self, u: Utterance) -> np.ndarray:
        """The int16 samples of ``u`` at :attr:`rate` Hz."""
        if self.lib.espeak_SetVoiceByName(u.voice.encode()) != 0:
            raise DataError(f"spoken-digits: eSpeak NG has no voice '{u.voice}'")
        for param, value in ((RATE, u.rate), (PITCH_PARAM, u.pitch), (RANGE, u.pitch_range)):
            self.lib.espeak_SetParameter(param, int(value), 0)
        self.lib.espeak_ng_SetRandSeed(int(u.seed))  # the noise sources of breathy and Klatt voices
        self._chunks = []
        text = u.text.encode()
        if self.lib.espeak_Synth(text, len(text) + 1, 0, POS_CHARACTER, 0, CHARS_UTF8, None, None) != 0:
            raise DataError(f"spoken-digits: eSpeak NG could not say {u.text!r} in voice '{u.voice}'")
        self.lib.espeak_Synchronize()
        return np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)


def _serve() -> None:
    """The other process of :func:`synthesise`: utterances as JSON lines on stdin; on stdout a JSON line (rate,
    version, each utterance's length) and then all the int16 samples."""
    engine = ESpeak()
    raw = [engine.say(Utterance(**json.loads(line))) for line in sys.stdin if line.strip()]
    head = {"rate": engine.rate, "version": engine.version, "lengths": [len(r) for r in raw]}
    sys.stdout.buffer.write(json.dumps(head).encode() + b"\n")
    sys.stdout.buffer.write(np.concatenate(raw).astype("<i2").tobytes() if raw else b"")
    sys.stdout.buffer.flush()


def synthesise(utterances: Sequence[Utterance]) -> tuple[int, str, List[np.ndarray]]:
    """(sample rate, eSpeak's version, each utterance's int16 samples), said in order by a fresh eSpeak in a new
    process, so that the same utterances give the same samples whatever this process said before."""
    _library()  # missing: one line here rather than a traceback from the other process
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds the package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    lines = "".join(json.dumps(asdict(u)) + "\n" for u in utterances).encode()
    done = subprocess.run([sys.executable, "-m", __name__], input=lines, capture_output=True, env=env)
    head, _, body = done.stdout.partition(b"\n")
    if done.returncode != 0 or not head:
        why = done.stderr.decode(errors="replace").strip().splitlines() or ["no output"]
        raise DataError(f"spoken-digits: eSpeak NG failed in its process (exit {done.returncode}: {why[-1]})")
    head = json.loads(head)
    samples = np.frombuffer(body, dtype="<i2").astype(np.int16)
    cuts = np.cumsum([0, *head["lengths"]])
    return head["rate"], head["version"], [samples[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


@dataclass
class ClipPlan:
    """What each clip of a split is: its digit, utterance, peak level (dB), SNR (dB), onset (share of the room)."""

    digits: np.ndarray
    utterances: List[Utterance]
    peak_db: np.ndarray
    snr_db: np.ndarray
    onset: np.ndarray
    noise_seeds: np.ndarray


def plan_clips(n_per_digit: int, variants: Sequence[str], seed: int) -> ClipPlan:
    """The clips of one split, ``n_per_digit`` of each digit in turn, every choice drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    n = 10 * n_per_digit
    digits = np.arange(n) % 10
    accents, kinds = rng.integers(len(ACCENTS), size=n), rng.integers(len(variants), size=n)
    rates, pitches = rng.integers(RATE_WPM[0], RATE_WPM[1] + 1, size=n), rng.integers(PITCH[0], PITCH[1] + 1, size=n)
    ranges, marks = rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1, size=n), rng.integers(len(PUNCTUATION), size=n)
    seeds = rng.integers(1, 2**31 - 1, size=(2, n))
    utterances = [Utterance(DIGITS[d] + PUNCTUATION[m], f"{ACCENTS[a]}+{variants[k]}", int(r), int(p), int(g), int(s))
                  for d, a, k, r, p, g, m, s in zip(digits, accents, kinds, rates, pitches, ranges, marks, seeds[0])]
    return ClipPlan(digits, utterances, rng.uniform(*PEAK_DB, size=n), rng.uniform(*SNR_DB, size=n),
                    rng.uniform(size=n), seeds[1])


def trim_silence(x: np.ndarray, frame: int = SAMPLE_RATE // 100, floor_db: float = SILENCE_DB) -> np.ndarray:
    """x (L,) without its leading and trailing frames quieter than ``floor_db`` below its loudest frame."""
    frames = len(x) // frame
    if frames == 0:
        return x
    rms = np.sqrt((x[: frames * frame].reshape(frames, frame) ** 2).mean(axis=1))
    loud = np.nonzero(rms > rms.max() * 10 ** (floor_db / 20))[0]
    if len(loud) == 0:
        return x[:0]
    return x[loud[0] * frame: (loud[-1] + 1) * frame]


def finish_clip(word: np.ndarray, peak_db: float, snr_db: float, onset: float, noise_seed: int) -> np.ndarray:
    """One second (LENGTH,) float64: ``word`` (trimmed, at 16 kHz) scaled to its peak level, placed at its onset
    (a share of the room left), plus white noise ``snr_db`` below the word's RMS level."""
    word = word[:LENGTH]
    peak = np.abs(word).max() if len(word) else 0.0
    word = word * (10 ** (peak_db / 20) / peak) if peak > 0 else word
    clip = np.zeros(LENGTH)
    start = int(onset * (LENGTH - len(word)))
    clip[start: start + len(word)] = word
    level = np.sqrt((word ** 2).mean()) if len(word) else 10 ** (PEAK_DB[0] / 20)
    return clip + np.random.default_rng(int(noise_seed)).standard_normal(LENGTH) * level * 10 ** (-snr_db / 20)


def to_int16(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1] -> int16: round(32768 x), clamped (the scale of :mod:`ddpmlab.io.sound`)."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def render_clips(plan: ClipPlan, raw: Sequence[np.ndarray], rate: int, progress: bool = False):
    """Each planned clip as int16 (LENGTH,), from eSpeak's samples ``raw`` at ``rate`` Hz; yields (index, clip)."""
    bar = progress_bar(progress, total=len(raw), desc="spoken digits", unit="clip")
    for start in range(0, len(raw), RESAMPLE_CHUNK):
        part = raw[start: start + RESAMPLE_CHUNK]
        batch = np.zeros((len(part), max(len(r) for r in part)))
        for i, r in enumerate(part):
            batch[i, : len(r)] = r / 32768.0
        batch = resample(torch.from_numpy(batch), rate, SAMPLE_RATE).numpy()
        for i, r in enumerate(part):
            k = start + i
            word = trim_silence(batch[i, : -(-len(r) * SAMPLE_RATE // rate)])
            yield k, to_int16(finish_clip(word, plan.peak_db[k], plan.snr_db[k], plan.onset[k], plan.noise_seeds[k]))
        bar.update(len(part))
    bar.close()


def _write_split(folder: Path, plan: ClipPlan, raw: Sequence[np.ndarray], rate: int, progress: bool) -> None:
    for name in DIGITS:
        (folder / name).mkdir(parents=True)
    for k, clip in render_clips(plan, raw, rate, progress):
        path = folder / DIGITS[plan.digits[k]] / f"{k // 10:05d}.wav"
        soundfile.write(str(path), clip, SAMPLE_RATE, format="WAV", subtype="PCM_16")


def _check_target(out: Path, n_per_digit: int) -> None:
    if out.exists():
        raise DataError(f"spoken-digits: '{out}' already exists; choose a new folder name or remove it first")
    if not out.parent.is_dir():
        raise DataError(f"spoken-digits: the folder '{out.parent}' that should hold '{out.name}' does not exist; "
                        "create it first")
    if n_per_digit < 1:
        raise DataError(f"spoken-digits: --n-per-digit must be at least 1, got {n_per_digit}")


def held_out_count(n_per_digit: int) -> int:
    """Held-out clips per digit for ``n_per_digit`` training clips per digit."""
    return max(MIN_HELD_OUT, n_per_digit // HELD_OUT_SHARE)


def describe(n_per_digit: int, seed: int, version: str) -> dict:
    """The folder's spoken_digits.json: what made it and where its splits are."""
    return {"generator": "ddpmlab.data.spoken_digits", "format": 1, "seed": seed, "synthesiser": f"eSpeak NG {version}",
            "sample_rate": SAMPLE_RATE, "length": LENGTH, "class_names": sorted(DIGITS),
            "splits": {TRAIN: {"folder": TRAIN, "per_digit": n_per_digit, "variants": list(TRAIN_VARIANTS)},
                       HELD_OUT: {"folder": HELD_OUT, "per_digit": held_out_count(n_per_digit),
                                  "variants": list(HELD_OUT_VARIANTS)}},
            "accents": list(ACCENTS), "punctuation": list(PUNCTUATION), "rate_wpm": list(RATE_WPM),
            "pitch": list(PITCH), "pitch_range": list(PITCH_RANGE), "peak_db": list(PEAK_DB), "snr_db": list(SNR_DB)}


def write_spoken_digits(out, n_per_digit: int = 300, seed: int = 0, progress: bool = True) -> Path:
    """Write the set to the new folder ``out`` as the module docstring shows (``n_per_digit`` training clips of each
    digit, :func:`held_out_count` held-out ones); returns its path."""
    out = Path(os.path.expanduser(str(out)))
    _check_target(out, int(n_per_digit))
    plans = {TRAIN: plan_clips(n_per_digit, TRAIN_VARIANTS, seed),
             HELD_OUT: plan_clips(held_out_count(n_per_digit), HELD_OUT_VARIANTS, seed + 1_000_003)}
    rate, version, raw = synthesise(plans[TRAIN].utterances + plans[HELD_OUT].utterances)
    n_train = len(plans[TRAIN].utterances)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_split(tmp / TRAIN, plans[TRAIN], raw[:n_train], rate, progress)
        _write_split(tmp / HELD_OUT, plans[HELD_OUT], raw[n_train:], rate, progress)
        (tmp / ABOUT_FILE).write_text(json.dumps(describe(n_per_digit, seed, version), indent=1) + "\n")
        os.replace(tmp, out)  # the whole folder appears at once
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def held_out_folder(train_path) -> Optional[Path]:
    """The held-out split beside ``train_path`` when it is the training split of a folder this module wrote
    (``<OUT>/train`` with ``<OUT>/spoken_digits.json``), else None."""
    train = Path(os.path.expanduser(str(train_path)))
    about_file = train.parent / ABOUT_FILE
    if train.name != TRAIN or not about_file.is_file():
        return None
    try:
        folder = json.loads(about_file.read_text())["splits"][HELD_OUT]["folder"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"'{about_file}' cannot be read ({type(e).__name__}: {e}); write the set again with "
                        "`ddpm data spoken-digits`") from None
    return train.parent / folder


if __name__ == "__main__":  # the synthesising process of synthesise()
    _serve()
