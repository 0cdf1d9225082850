"""A flow run exported to diffusers: FlowMatchEulerDiscreteScheduler and the exported network, stepped by
diffusers itself, draw ddpmlab's flow_euler samples from the same seed (float32, 1e-4 on images in [0, 1])."""

import json
import re

import pytest
import torch
from _util import perturb

from ddpmlab.cli import main
from ddpmlab.config import load_config, save_config
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import CONFIG_FILE, save_checkpoint
from ddpmlab.io.diffusers_bridge import export_diffusers, load_diffusers_model
from ddpmlab.io.diffusers_schedule import diffusion_from_scheduler
from ddpmlab.models import build_model
from ddpmlab.models.transformer import sincos_2d
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import ClassifierFreeGuidance

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

FLOW = ["diffusion.process=flow", "diffusion.prediction=velocity"]
UNET = ["data.dataset=folder", "data.path=unused", "data.image_size=[16,16]", "data.channels=3",
        "unet.base_channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1", "unet.attention_resolutions=[8]",
        "unet.norm_groups=8", "unet.dropout=0.0"]
DIT = ["data.dataset=folder", "data.path=unused", "data.image_size=[8,8]", "data.channels=3", "model.kind=dit",
       "dit.depth=2", "dit.hidden=32", "dit.heads=4", "dit.patch_size=2"]
TOL = 1e-4  # float32 through two implementations of the same steps; images in [0, 1]


def _fake_run(tmp_path, overrides):
    """A flow run folder holding a randomly initialised network as its EMA weights (no training needed)."""
    cfg = load_config(None, [*FLOW, *overrides])
    model = perturb(build_model(cfg), seed=0, scale=0.1 if cfg.model.kind == "dit" else 0.05)
    if cfg.model.kind == "dit":
        model.pos_embed.data.copy_(sincos_2d(32, 4, 4))  # fixed, never trained: diffusers recomputes it
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / CONFIG_FILE)
    sd = model.state_dict()
    save_checkpoint(run, 1, sd, sd, torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    return run, cfg, model.eval()


def _readme_loop(out):
    """The ``sample`` function of the exported README.md (its first python block), run as a user would."""
    code = re.search(r"```python\n(.*?)```", (out / "README.md").read_text(), re.S).group(1)
    scope = {}
    exec(code, scope)
    return scope["sample"]


def _ours(cfg, model, n, steps, seed, clip, labels=None, guidance=None):
    """ddpmlab's flow_euler images in [0, 1] (generate: the noise of `ddpm sample --seed`)."""
    net = model if guidance is None else ClassifierFreeGuidance(model, scale=guidance)
    x = generate(net, NoiseSchedule.from_config(cfg.diffusion), (3, *cfg.data.image_size), n, sampler="flow_euler",
                 steps=steps, prediction="velocity", clip_x0=1.0 if clip else None, seed=seed, labels=labels,
                 progress=False, shift=cfg.diffusion.flow_shift)
    return (x / 2 + 0.5).clamp(0, 1)


def _gap(a, b) -> float:
    return (a - b).abs().max().item()


def test_an_unconditional_unet_flow_run_samples_in_diffusers_ddpm_pipeline_as_flow_euler(tmp_path):
    run, cfg, model = _fake_run(tmp_path, UNET)
    out = export_diffusers(run, tmp_path / "exported")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline" and index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    assert (pipe.scheduler.config.num_train_timesteps, pipe.scheduler.config.shift) == (1000, 1.0)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(5), num_inference_steps=8,
                  output_type="pt").images  # DDPMPipeline's own loop: noise, set_timesteps(8), unet, step
    plain, clipped = _ours(cfg, model, 3, 8, 5, clip=False), _ours(cfg, model, 3, 8, 5, clip=True)
    assert _gap(theirs, plain) < TOL, _gap(theirs, plain)
    sample = _readme_loop(out)
    assert _gap(sample(str(out), n=3, steps=8, seed=5, clip=False), plain) < TOL
    assert _gap(sample(str(out), n=3, steps=8, seed=5), clipped) < TOL  # `ddpm sample` clamps x0 to [-1, 1]
    assert _gap(plain, clipped) > 0.05 and plain.std() > 0.05  # real images, and the clamp did something


def test_a_class_conditional_unet_flow_run_with_shift_and_guidance_samples_by_the_exported_loop(tmp_path):
    run, cfg, model = _fake_run(tmp_path, [*UNET, "model.num_classes=3", "diffusion.flow_shift=3.0"])
    out = export_diffusers(run, tmp_path / "exported")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(str(out), subfolder="scheduler")
    assert (scheduler.config.num_train_timesteps, scheduler.config.shift) == (1000, 3.0)
    sample, labels = _readme_loop(out), torch.tensor([0, 1, 2, 1])
    for guidance in (1.0, 2.5):
        theirs = sample(str(out), n=4, steps=6, seed=3, labels=labels, guidance=guidance)
        ours = _ours(cfg, model, 4, 6, 3, clip=True, labels=labels, guidance=guidance)
        assert _gap(theirs, ours) < TOL, (guidance, _gap(theirs, ours))
    assert _gap(ours, _ours(cfg, model, 4, 6, 3, clip=True, labels=labels, guidance=1.0)) > 0.01  # guidance acts
    # the folder imports back as a flow run with the same weights
    cfg2, back = load_diffusers_model(out)
    assert (cfg2.diffusion.process, cfg2.diffusion.prediction, cfg2.diffusion.flow_shift) == ("flow", "velocity", 3.0)
    assert cfg2.model.num_classes == 3
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_dit_flow_run_exports_with_the_flow_scheduler_and_samples_by_the_exported_loop(tmp_path):
    run, cfg, model = _fake_run(tmp_path, [*DIT, "model.num_classes=3"])
    out = export_diffusers(run, tmp_path / "exported")
    assert (out / "transformer" / "config.json").is_file() and (out / "README.md").is_file()
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    labels = torch.tensor([2, 0, 1])
    theirs = _readme_loop(out)(str(out), n=3, steps=5, seed=1, labels=labels, guidance=2.0)
    ours = _ours(cfg, model, 3, 5, 1, clip=True, labels=labels, guidance=2.0)
    assert _gap(theirs, ours) < TOL and ours.std() > 0.05, _gap(theirs, ours)


def test_ddpm_export_of_a_flow_run_says_how_to_load_it_and_the_folder_samples_with_flow_euler(tmp_path, monkeypatch,
                                                                                              capsys):
    run, _, _ = _fake_run(tmp_path, UNET)
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "out"]) == 0
    said = capsys.readouterr().out
    assert "DDPMPipeline.from_pretrained" in said and "README.md has the loop" in said
    assert main(["sample", "--from-diffusers", "out", "--n", "2", "--steps", "3", "--device", "cpu",
                 "--no-progress"]) == 0
    assert (tmp_path / "samples" / "flow_euler_3steps_seed0.png").is_file()  # the flow's own sampler


@pytest.mark.parametrize("key, value", [("invert_sigmas", True), ("use_dynamic_shifting", True),
                                        ("shift_terminal", 0.1)])
def test_a_flow_scheduler_whose_times_do_not_map_is_refused_naming_the_key(key, value):
    conf = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0, key: value}
    with pytest.raises(DDPMError, match=f"FlowMatchEulerDiscreteScheduler with {key}="):
        diffusion_from_scheduler(conf)
    del conf[key]
    assert diffusion_from_scheduler(conf)["process"] == "flow"
