"""The shipped spoken-digit classifier: the judge of sound runs' samples, with an eleventh class "not a digit".

The DiffWave paper scores class-conditional SC09 samples with a classifier of the ten digits: its accuracy on the
asked digit, an Inception-Score-like measure of its class probabilities and a Frechet distance of its features
(Kong et al. 2021, Sec. 5.2).  A classifier that knows only digits calls noise a digit, often confidently, so this
one has an eleventh class, :data:`NOT_A_DIGIT`, trained on what a failed model draws (noise, silence, hard-clipped
and shuffled speech, speech-shaped noise): a garbage sample counts as wrong and adds no spread to the score.

    >>> net = load_speech_classifier()        # eval mode, parameters frozen
    >>> logits = net(x)                       # x: (B, 1, 16000) in [-1, 1] at 16 kHz -> (B, 11)
    >>> feats = net.features(x)               # (B, 128), the penultimate layer

The input is the log-mel spectrogram of :mod:`ddpmlab.data.mel` (40 bands from 20 Hz to 8 kHz, 32 ms windows, 10 ms
hop).  The weights (``assets/speech_digits_classifier.safetensors``, float16) are made by
``benchmarks/train_speech_classifier.py`` from a ``ddpm data spoken-digits`` set; the file's metadata records its
accuracy on held-out voices and what it says of white noise and silence.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, Sequence, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from ddpmlab.data import build_dataset
from ddpmlab.data.audio import AudioFolderDataset
from ddpmlab.data.mel import log_mel, mel_spectrogram
from ddpmlab.data.spoken_digits import DIGITS, LENGTH, SAMPLE_RATE, held_out_folder
from ddpmlab.errors import DDPMError, OptionError
from ddpmlab.evaluate.classifier import save_classifier
from ddpmlab.evaluate.features import Extractor
from ddpmlab.io.weights import file_sha256

WEIGHTS = Path(__file__).parent / "assets" / "speech_digits_classifier.safetensors"
NOT_A_DIGIT = len(DIGITS)  # the eleventh class
CLASS_NAMES = DIGITS + ("not a digit",)
CLIP_SHAPE = (1, LENGTH)
MEL = {"n_fft": 512, "hop_length": 160, "n_mels": 40, "f_min": 20.0, "f_max": 8000.0}  # 32 ms windows, 10 ms hop


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    # 3x3 convolution, batch norm, ReLU
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SpeechDigitClassifier(nn.Module):
    """A small CNN on the log-mel spectrogram (40 bands x 101 frames): four 3x3 convolutions (16, 32, 64, 128
    channels), three 2x2 max-pools, a global average -> 128 features -> 11 logits.

    ``forward(x)``: x (B, 1, 16000) in [-1, 1] -> logits (B, 11) (the ten digits in :data:`DIGITS` order, then
    "not a digit"); ``features(x)``: (B, num_features) after the global average pool.
    """

    def __init__(self, width: int = 16, num_features: int = 128, num_classes: int = NOT_A_DIGIT + 1,
                 dropout: float = 0.2):
        super().__init__()
        self.num_features = num_features  # read by torchmetrics' FID for custom extractors
        self.norm = nn.BatchNorm2d(1)  # the log-mel's scale, learned from the data, fixed in eval mode
        self.body = nn.Sequential(
            _conv_block(1, width), nn.MaxPool2d(2),  # (40, 101) -> (20, 50)
            _conv_block(width, 2 * width), nn.MaxPool2d(2),  # -> (10, 25)
            _conv_block(2 * width, 4 * width), nn.MaxPool2d(2),  # -> (5, 12)
            _conv_block(4 * width, num_features), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.metadata: Dict[str, str] = {}

    def spectrogram(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 16000) -> its log-mel spectrogram (B, 1, 40, 101)."""
        if tuple(x.shape[1:]) != CLIP_SHAPE:
            raise DDPMError(f"the spoken-digit classifier needs mono clips of shape {CLIP_SHAPE} (1 s at "
                            f"{SAMPLE_RATE} Hz), got {tuple(x.shape[1:])}")
        return log_mel(mel_spectrogram(x.float(), SAMPLE_RATE, **MEL))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 16000) in [-1, 1] -> (B, num_features)."""
        return self.body(self.norm(self.spectrogram(x)))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, num_features) -> logits (B, num_classes)."""
        return self.head(self.dropout(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.features(x))


def save_speech_classifier(model: SpeechDigitClassifier, path: Union[str, Path], metadata: Dict[str, object]) -> Path:
    """Write the weights as float16 safetensors (BatchNorm statistics too) with string metadata."""
    return save_classifier(model, path, metadata)


def load_speech_classifier(device: Union[str, torch.device] = "cpu", path: Union[str, Path] = WEIGHTS):
    """The shipped classifier (or the file ``path``), in eval mode and frozen; ``net.metadata`` holds the file's."""
    path = Path(path)
    if not path.is_file():
        raise DDPMError(f"spoken-digit classifier weights '{path}' not found; reinstall ddpmlab or run "
                        "benchmarks/train_speech_classifier.py to recreate them")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    model = SpeechDigitClassifier(**json.loads(meta.get("config", "{}")))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()})
    model.metadata = meta
    return model.to(device).eval().requires_grad_(False)


def digit_order(class_names: Sequence[str]) -> list[int]:
    """For a sound set's classes (sub-folder names, any case: 'zero' .. 'nine', as SC09's 'Zero' ..), the index in
    :data:`DIGITS` of each; no names: the labels are the digits 0..9.  An OptionError about 'metrics' otherwise."""
    if not class_names:
        return list(range(len(DIGITS)))
    words = [str(n).strip().lower() for n in class_names]
    unknown = [n for n, w in zip(class_names, words) if w not in DIGITS]
    if unknown or len(set(words)) != len(words):
        raise OptionError("metrics", f"the spoken-digit classifier knows the classes {', '.join(DIGITS)}; this "
                                     f"run's classes are {', '.join(map(str, class_names))} (not {unknown or words}); "
                                     "drop acc, is and fd")
    return [DIGITS.index(w) for w in words]


class _InClassOrder(nn.Module):
    """The classifier with its logits in a data set's class order, "not a digit" last (what acc compares)."""

    def __init__(self, net: SpeechDigitClassifier, order: Sequence[int]):
        super().__init__()
        self.net = net
        self.num_features = net.num_features
        self.register_buffer("order", torch.tensor([*order, NOT_A_DIGIT]), persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.features(x)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.classify(features)[:, self.order]


def speech_extractor(class_names: Sequence[str] = (), device: Union[str, torch.device] = "cpu",
                     path: Union[str, Path] = WEIGHTS) -> Extractor:
    """The classifier as a feature extractor of clips (1, 16000): 128 features; logits (B, K + 1) of the K classes
    ``class_names`` (digit words, see :func:`digit_order`) in their order, then "not a digit"."""
    net = load_speech_classifier(device, path)
    wrapped = _InClassOrder(net, digit_order(class_names)).to(device)
    return Extractor(wrapped, "speech-digits", f"speech-digits-classifier-{file_sha256(Path(path))[:16]}",
                     net.num_features, input_shape=CLIP_SHAPE,
                     hint="; the spoken-digit classifier reads mono 1 s clips at 16 kHz")


def reference_data(run, extractor: str = "classifier"):
    """The data a run's samples are scored against in ``ddpm eval``: its data set, or for a sound run
    :func:`sound_reference`."""
    return sound_reference(run, extractor) if run.is_audio else build_dataset(run.cfg)


def sound_reference(run, extractor: str = "classifier") -> AudioFolderDataset:
    """The real clips a sound run's samples are scored against (``ddpm eval``): the held-out split when the run
    trained on the ``train`` folder of a ``ddpm data spoken-digits`` set, else (with a warning) its own training
    clips.  OptionErrors for what the spoken-digit classifier cannot judge: another extractor, another clip shape
    or sample rate, classes that are not the digit words or differ from the reference's."""
    d = run.cfg.data
    if extractor != "classifier":
        raise OptionError("extractor", f"sound is scored by the spoken-digit classifier; drop the extractor "
                                       f"'{extractor}' (and any Inception weights)")
    if (d.channels, d.length, d.sample_rate) != (*CLIP_SHAPE, SAMPLE_RATE):
        raise OptionError("metrics", f"the spoken-digit classifier reads mono 1 s clips at {SAMPLE_RATE} Hz; this run "
                                     f"makes {d.channels} channel(s) of {d.length} samples at {d.sample_rate} Hz")
    folder = held_out_folder(d.path)
    if folder is None:
        warnings.warn(f"ddpm eval: '{d.path}' is not the train folder of a `ddpm data spoken-digits` set; the run's "
                      "own training clips are the reference (no held-out voices)", stacklevel=2)
        data = AudioFolderDataset(d.path, d.sample_rate, d.length, d.channels)  # clips, whatever the representation
        data.description = f"the training clips in {d.path}"
    else:
        data = AudioFolderDataset(folder, d.sample_rate, d.length, d.channels)
        data.description = f"the held-out clips in {folder}"
    names = [n.lower() for n in run.class_names]
    if run.num_classes and names and names != [n.lower() for n in data.class_names]:
        raise OptionError("metrics", f"this run's classes ({', '.join(run.class_names)}) are not those of "
                                     f"{data.description} ({', '.join(data.class_names)})")
    digit_order(data.class_names if run.num_classes else ())  # classes the classifier knows
    return data


@torch.no_grad()
def probabilities(net: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Class probabilities (N, 11) of clips x (N, 1, 16000)."""
    device = next(net.parameters()).device
    return torch.cat([net(x[i:i + batch_size].to(device)).softmax(1).cpu() for i in range(0, len(x), batch_size)])


def confidence(p: torch.Tensor) -> Dict[str, float]:
    """What probabilities p (N, K) say: mean max-probability, mean entropy (nats), share called "not a digit"."""
    entropy = -(p * p.clamp_min(1e-12).log()).sum(1)
    return {"max_probability": float(p.max(1).values.mean()), "entropy": float(entropy.mean()),
            "not_a_digit": float((p.argmax(1) == NOT_A_DIGIT).float().mean())}


def not_digits(clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """As many clips (N, 1, L) of "not a digit", made from the speech clips ``clips`` (N, 1, L): in turn white
    noise, silence (near zero), brown noise, speech-shaped noise (each clip's spectrum, random phases), speech
    hard-clipped to a square wave, and speech cut into 20-60 ms pieces put in random order."""
    n, _, length = clips.shape
    kinds = torch.arange(n) % 6
    level = 10 ** (-3.5 + 3.0 * torch.rand(n, 1, 1, generator=generator))  # RMS 3e-4 .. 0.3
    noise = torch.randn(clips.shape, generator=generator)
    out = noise * level
    out[kinds == 1] *= 0.01  # near silence
    brown = noise.cumsum(-1)
    brown = brown - brown.mean(-1, keepdim=True)
    out[kinds == 2] = (brown / brown.std(-1, keepdim=True) * level)[kinds == 2]
    phases = torch.rand(n, 1, length // 2 + 1, generator=generator) * 2 * torch.pi
    shaped = torch.fft.irfft(torch.fft.rfft(clips).abs() * torch.exp(1j * phases), n=length)
    out[kinds == 3] = shaped[kinds == 3]
    out[kinds == 4] = (clips * 300).clamp(-1, 1)[kinds == 4] * (0.2 + 0.8 * torch.rand(1, generator=generator))
    for i in torch.nonzero(kinds == 5).flatten().tolist():
        piece = int(torch.randint(320, 960, (1,), generator=generator))
        parts = list(clips[i, 0].split(piece))
        out[i, 0] = torch.cat([parts[j] for j in torch.randperm(len(parts), generator=generator)])
    return out.clamp(-1, 1)
