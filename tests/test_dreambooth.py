"""DreamBooth (Ruiz et al. 2023) on tiny text runs: the prior-preservation loss is L_instance + lambda L_prior as
computed by hand from the schedule; class images are drawn by the base and a run stopped while drawing them draws
the same images; a DreamBooth run (all weights, and LoRA) resumes bit for bit; the identifier joins the own
vocabulary as [UNK]; one-line refusals."""

import math
import shutil

import numpy as np
import pytest
import torch
from _text_runs import finetune, one_thread_main, shapes_folder, train_text
from _util import one_line_error
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.config import load_config
from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.diffusion.objectives import objective_from_config
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.io.adapters import ADAPTER_FILE
from ddpmlab.io.diffusers_lora import DIFFUSERS_LORA_FILE
from ddpmlab.runs import load_run
from ddpmlab.training.class_images import CLASS_DIR, draw_class_images
from ddpmlab.training.tasks.dreambooth import dreambooth_loss
from ddpmlab.training.tasks.finetune import finetune_run

pytest.importorskip("transformers")
SUBJECT = ["finetune.token=sks", "finetune.class_word=square", "finetune.class_images=5", "finetune.prior_weight=0.5",
           "train.steps=4", "train.lr=3e-3"]


def _ckpt(run, step, part="ema"):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


class _Net(torch.nn.Module):
    """eps_theta(x_t, t) = w * x_t + b * t / T: a network whose loss is easy to write by hand."""

    def forward(self, x, t, y=None):
        return 0.7 * x + 0.3 * (t.float() / 1000.0)[:, None, None, None]


@pytest.mark.parametrize("process", ["ddpm", "flow"])
def test_the_loss_is_instance_plus_lambda_prior_by_hand(process):
    over = ["diffusion.process=flow", "diffusion.prediction=velocity"] if process == "flow" else \
        ["diffusion.process=ddpm", "diffusion.prediction=eps", "diffusion.schedule=linear"]
    cfg = load_config(None, over)
    objective = objective_from_config(cfg, NoiseSchedule.from_config(cfg.diffusion))
    g = torch.Generator().manual_seed(0)
    x, xp = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    e, ep = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    if process == "flow":
        t, tp = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0.3, 0.2, 0.7])
    else:
        t, tp = torch.tensor([0, 499, 999]), torch.tensor([10, 250, 700])
    total, inst, prior = dreambooth_loss(objective, (_Net(), x, t, e, None), (_Net(), xp, tp, ep, None), 0.25)

    def by_hand(x0, tt, eps):
        if process == "flow":  # x_t = (1 - t) x0 + t eps, target eps - x0, the network at t * 1000
            xt = (1 - tt)[:, None, None, None] * x0 + tt[:, None, None, None] * eps
            out = 0.7 * xt + 0.3 * tt[:, None, None, None]
            return ((out - (eps - x0)) ** 2).mean().item()
        betas = np.linspace(1e-4, 0.02, 1000)  # Ho et al. 2020's linear schedule
        ab = torch.tensor(np.cumprod(1 - betas)[tt.numpy()], dtype=torch.float32)[:, None, None, None]
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # Ho et al. 2020, Eq. 4
        out = 0.7 * xt + 0.3 * (tt.float() / 1000)[:, None, None, None]
        return ((out - eps) ** 2).mean().item()  # L_simple, Eq. 14

    li, lp = by_hand(x, t, e), by_hand(xp, tp, ep)
    assert math.isclose(inst.item(), li, rel_tol=1e-5) and math.isclose(prior.item(), lp, rel_tol=1e-5)
    assert math.isclose(total.item(), li + 0.25 * lp, rel_tol=1e-5)
    alone = dreambooth_loss(objective, (_Net(), x, t, e, None), None, 0.25)
    assert math.isclose(alone[0].item(), li, rel_tol=1e-5) and alone[2].item() == 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step own-encoder base run, three green squares, and their 4-step DreamBooth with 5 class images."""
    root = tmp_path_factory.mktemp("db")
    base = train_text(shapes_folder(root / "data"), root, "base", 2, "unet.positions=false")  # maps to diffusers
    few = shapes_folder(root / "few", colours=("green",) * 3, shapes=("square",), captions=False)
    assert one_thread_main(finetune(base, root, "db", "dreambooth", f"data.path={few}", *SUBJECT)) == 0
    return base, few, root / "db"


def test_class_images_are_drawn_once_and_again_alike_after_a_stop(runs, tmp_path):
    base, _, db = runs
    drawn = sorted((db / CLASS_DIR).glob("*.png"))
    assert [p.name for p in drawn] == [f"{i:06d}.png" for i in range(5)]
    cfg = load_run(db, device="cpu").cfg
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in drawn[:2]:  # a run stopped after two of them
        shutil.copy(p, cut / p.name)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        draw_class_images(lambda: load_run(base, device="cpu"), cfg, cut, ["a square"], 5, progress=False)
    finally:
        torch.set_num_threads(n)
    assert all((cut / p.name).read_bytes() == p.read_bytes() for p in drawn)

    def no_base():
        raise AssertionError("the images are there: the base is not loaded")

    draw_class_images(no_base, cfg, cut, ["a square"], 5, progress=False)
    log = (db / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss,instance,prior,")


def test_the_identifier_joins_the_own_vocabulary_as_unk(runs):
    base, _, db = runs
    vocab, grown = CaptionTokenizer.load(base, 12), CaptionTokenizer.load(db, 12)
    assert grown.tokenizer.token_to_id("sks") == vocab.vocab_size == grown.vocab_size - 1
    start = _ckpt(base, 2)["text_encoder.token_embedding.weight"]
    assert _ckpt(db, 4)["text_encoder.token_embedding.weight"].shape[0] == start.shape[0] + 1
    assert (db / "samples" / "prompts.txt").read_text().split("\n")[0] == "a sks square"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_dreambooth_run_resumes_bit_identically(runs, tmp_path, one_thread, lora):
    base, few, straight = runs
    extra = ["finetune.lora=true"] if lora else []
    if lora:
        assert main(finetune(base, tmp_path, "straight", "dreambooth", f"data.path={few}", *SUBJECT, *extra)) == 0
        straight = tmp_path / "straight"
        assert (straight / ADAPTER_FILE).is_file() and (straight / DIFFUSERS_LORA_FILE).is_file()
    args = finetune(base, tmp_path, "stopped", "dreambooth", f"data.path={few}", *SUBJECT, *extra)
    finetune_run(base, "dreambooth", [a for a in args if "=" in a], progress=False, stop_after=2)
    assert main(["finetune", "--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    for part in ("model", "ema", "optimizer"):
        a, b = _ckpt(straight, 4, part), _ckpt(tmp_path / "stopped", 4, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    start, end = _ckpt(base, 2), _ckpt(straight, 4)
    key = "denoiser.conv_in.weight"
    if lora:  # the base frozen, adapters in the denoiser's attention projections only
        adapted = [k for k in end if ".base_layer." in k]
        assert adapted and all(k.startswith("denoiser.") for k in end if ".lora_" in k)
        assert torch.equal(end[key], start[key])
        assert all(torch.equal(end[k], start[k.replace(".base_layer.", ".")]) for k in adapted)
    else:
        assert not torch.equal(end[key], start[key])




def test_refusals_are_one_line(runs, tmp_path, capsys):
    base, few, _ = runs
    data = f"data.path={few}"
    one_line_error(capsys, finetune(base, tmp_path, "a", "dreambooth", data, "finetune.token=sks"),
                    "finetune.class_word")
    captioned = shapes_folder(tmp_path / "captioned", colours=("green",), shapes=("square",))
    one_line_error(capsys, finetune(base, tmp_path, "b", "dreambooth", f"data.path={captioned}", *SUBJECT,
                                     "finetune.replace=[purple circle]"), "finetune.replace", "'0.png'")
    one_line_error(capsys, finetune(base, tmp_path, "c", "full", data, "finetune.token=sks"),
                    "finetune.token cannot change")
    assert not any((tmp_path / n).exists() for n in "abc")
