"""One training step: importance sampling in micro-batches, and what `ddpm train` says first and last."""

import csv
import json
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpmlab.config import load_config
from ddpmlab.diffusion.objectives import DiffusionObjective
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.training.tasks.diffusion import train
from ddpmlab.training.run_folder import resume_config

pytestmark = pytest.mark.usefixtures("one_thread")

T = 50
S = NoiseSchedule.make("linear", T)


class Head(torch.nn.Module):
    """A tiny network with eps and variance outputs for (B, 2) points."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.SiLU(), torch.nn.Linear(32, 4))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x, t.float()[:, None] / T], 1))


def _warm_importance_objective():
    """An L_vlb objective whose importance-sampling history is full and far from uniform."""
    objective = DiffusionObjective(S, loss_type="vlb", variance="learned_range", decoder="continuous",
                                   t_sampling="importance")
    g = torch.Generator().manual_seed(1)
    t = torch.arange(T).repeat(10)
    objective.t_sampler.update(t, (t + 1).double() * (1 + 0.2 * torch.rand(len(t), generator=g, dtype=torch.float64)))
    assert objective.t_sampler.warm()
    return objective


def _one_step(objective, model, x0, t, noise, k):
    """The loss, gradients and weights 1 / (T p_t) of one optimizer step taken in k micro-batches."""
    weights, drawn = [], objective.t_sampler.weights
    objective.t_sampler.weights = lambda tt: weights.append(drawn(tt)) or weights[-1]
    model.zero_grad()
    loss = torch.zeros(())
    for xj, tj, nj in zip(x0.chunk(k), t.chunk(k), noise.chunk(k)):
        part = objective(model, xj, t=tj, noise=nj) / k
        part.backward()
        loss = loss + part.detach()
    objective.end_step()
    grads = [p.grad.clone() for p in model.parameters()]
    return loss, grads, torch.cat(weights)


def test_importance_sampling_in_two_micro_batches_equals_one_batch():
    # every micro-batch of a step is weighted by the p_t its t were drawn from; the history learns once per step
    model = Head()
    one, two = _warm_importance_objective(), _warm_importance_objective()
    g = torch.Generator().manual_seed(2)
    t = one.sample_timesteps(128, generator=g)
    x0, noise = torch.randn(128, 2, generator=g) * 0.5, torch.randn(128, 2, generator=g)
    loss1, grads1, w1 = _one_step(one, model, x0, t, noise, k=1)
    loss2, grads2, w2 = _one_step(two, model, x0, t, noise, k=2)
    assert torch.equal(w1, w2)
    assert loss1.item() == pytest.approx(loss2.item(), rel=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads1, grads2))
    s1, s2 = one.state_dict(), two.state_dict()
    assert s1["count"] == s2["count"]
    assert torch.allclose(torch.tensor(s1["history"]), torch.tensor(s2["history"]), rtol=1e-6, atol=0)
    assert s1 != _warm_importance_objective().state_dict()  # the step did update the history


def _toy_cfg(root, name, steps, *extra):
    return load_config("toy2d", [f"train.out_dir={root}", f"train.name={name}", f"train.steps={steps}",
                                 "diffusion.num_timesteps=50", "train.batch_size=128", "train.save_every=5",
                                 "train.sample_n=16", "train.sample_steps=10", "train.sample_sampler=ddpm",
                                 "train.log_every=1", "mlp.hidden=32", "mlp.num_layers=1", "data.toy_samples=500",
                                 "diffusion.variance=learned_range", "diffusion.loss_type=vlb",
                                 "diffusion.t_sampling=importance", "train.mixed_precision=no", *extra])


def test_importance_sampling_step_with_grad_accumulation_equals_one_micro_batch(tmp_path):
    train(_toy_cfg(tmp_path, "base", 10), progress=False)  # 10 steps of 128 at T = 50: the history is warm
    ends = {}
    for k in (1, 2):
        run = tmp_path / f"k{k}"
        shutil.copytree(tmp_path / "base", run)
        cfg = resume_config(run, _toy_cfg(tmp_path, run.name, 11, f"train.grad_accum_steps={k}"),
                            ["train.steps", "train.grad_accum_steps"])
        train(cfg, run_dir=run, resume=True, progress=False)
        ckpt = run / "checkpoints/step_0000011"
        loss = float(list(csv.DictReader((run / "log.csv").open()))[-1]["loss"])
        ends[k] = (loss, load_file(ckpt / "model.safetensors"), json.loads((ckpt / "state.json").read_text()))
    (loss1, w1, s1), (loss2, w2, s2) = ends[1], ends[2]
    assert min(s1["objective"]["count"]) == 10
    assert loss1 == pytest.approx(loss2, rel=1e-5)
    assert all(torch.allclose(w1[k], w2[k], rtol=0, atol=1e-6) for k in w1)
    assert s1["objective"]["count"] == s2["objective"]["count"]
    h1, h2 = (torch.tensor(s["objective"]["history"]) for s in (s1, s2))
    assert torch.allclose(h1, h2, rtol=1e-5, atol=0)


def _photos(folder, sizes):
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        Image.fromarray(pixels, "RGB").save(folder / f"img{i}.png")
    return folder


TINY_UNET = ["unet.base_channels=16", "unet.norm_groups=8", "unet.channel_mults=[1,2]",
             "unet.attention_resolutions=[]", "unet.num_res_blocks=1", "train.batch_size=4", "train.steps=1",
             "train.sample_n=1", "train.sample_steps=1", "train.warmup_steps=1", "train.log_every=1"]


def test_first_line_names_the_image_folder_its_size_and_the_larger_originals(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", [(40, 30), (64, 48), (20, 16)])
    cfg = load_config("cifar10", ["data.dataset=folder", f"data.path={photos}", "data.image_size=[16,16]",
                                  "data.channels=3", f"train.out_dir={tmp_path}", "train.name=r", *TINY_UNET])
    train(cfg, progress=False)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == (f"data: 3 images from {photos}, resized and center-cropped to 16x16, 3 channels "
                     "(originals up to 64x48: set data.image_size to train at a higher resolution)")


def test_first_line_of_small_originals_does_not_advise_a_higher_resolution(tmp_path, capsys):
    photos = _photos(tmp_path / "small", [(12, 12), (16, 10)])
    cfg = load_config("cifar10", ["data.dataset=folder", f"data.path={photos}", "data.image_size=[16,16]",
                                  "data.channels=1", f"train.out_dir={tmp_path}", "train.name=r", *TINY_UNET])
    train(cfg, progress=False)
    first = capsys.readouterr().out.splitlines()[0]
    assert first == f"data: 2 images from {photos}, resized and center-cropped to 16x16, 1 channel"


def test_train_names_the_bundled_data_first_and_ends_with_the_next_commands(tmp_path, capsys):
    cfg = load_config("mnist", ["data.dataset=digits", f"train.out_dir={tmp_path}", "train.name=r", *TINY_UNET])
    run = train(cfg, progress=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "data: the bundled digits (1,797 images of 8x8, 1 channel; split all)"
    done = next(i for i, line in enumerate(lines) if line.startswith("done: "))
    assert [line.strip() for line in lines[done + 1:]] == [
        "next:", f"ddpm sample {run} --sampler dpmpp_2m_sde --steps 1", f"ddpm eval {run}", f"ddpm viz loss {run}"]
