"""The shipped MNIST classifier: accurate on held-out digits, small, and its recorded accuracy is true."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddpmlab.data import load_mnist
from ddpmlab.errors import DDPMError
from ddpmlab.evaluate.classifier import WEIGHTS, accuracy, load_classifier, load_mnist_classifier

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net():
    torch.set_num_threads(1)
    return load_mnist_classifier()


def test_classifier_reaches_97_percent_on_held_out_digits_as_recorded(net):
    x, y = load_mnist("test")  # never seen in training (the script trains on the "train" split)
    acc = accuracy(net, x, y)
    assert acc >= 0.97
    assert f"{acc:.4f}" == net.metadata["test_accuracy"]  # the file records the truth
    assert net.metadata["script"] == "benchmarks/train_mnist_classifier.py"


def test_classifier_api_shapes_and_eval_mode(net):
    x, _ = load_mnist("test")
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    logits, feats = net(x[:5]), net.features(x[:5])
    assert logits.shape == (5, 10) and feats.shape == (5, net.num_features)
    assert torch.allclose(net.classify(feats), logits, atol=1e-5)
    with pytest.raises(DDPMError, match="1, 28, 28"):
        net.features(torch.zeros(2, 3, 32, 32))


def test_classifier_weights_are_small_safetensors():
    assert WEIGHTS.suffix == ".safetensors" and WEIGHTS.stat().st_size < 400_000


def test_missing_classifier_file_is_a_clear_error(tmp_path):
    with pytest.raises(DDPMError, match="train_mnist_classifier.py"):
        load_classifier(tmp_path / "none.safetensors")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DDPMLAB_SLOW"), reason="retrains the classifier (minutes); DDPMLAB_SLOW=1")
def test_training_script_reproduces_the_shipped_accuracy(tmp_path):
    out = tmp_path / "c.safetensors"
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "train_mnist_classifier.py"), "--out", str(out)],
                   check=True, cwd=REPO)
    assert load_classifier(out).metadata["test_accuracy"] == load_mnist_classifier().metadata["test_accuracy"]
