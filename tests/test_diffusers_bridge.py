"""The diffusers bridge: exported pipelines compute what ddpmlab computes, imported models sample alike."""

import json
import sys

import pytest
import torch
from _util import perturb

from ddpmlab.cli import main
from ddpmlab.config import load_config, save_config
from ddpmlab.diffusion.schedules import NoiseSchedule, make_betas
from ddpmlab.errors import DDPMError
from ddpmlab.io.checkpoint import CONFIG_FILE, save_checkpoint
from ddpmlab.io.diffusers_bridge import (
    export_diffusers,
    from_diffusers_state_dict,
    load_diffusers_model,
    to_diffusers_state_dict,
    unet2d_config,
)
from ddpmlab.io.diffusers_schedule import diffusion_from_scheduler, require_diffusers, scheduler_config
from ddpmlab.models import UNet, build_model
from ddpmlab.samplers.generate import generate

diffusers = pytest.importorskip("diffusers")

SMALL = ["data.dataset=folder", "data.path=unused", "data.image_size=[16,16]", "data.channels=3",
         "unet.base_channels=16", "unet.channel_mults=[1,2]", "unet.num_res_blocks=1",
         "unet.attention_resolutions=[8]", "unet.norm_groups=8", "unet.dropout=0.0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _fake_run(tmp_path, overrides, seed=0):
    """A run directory holding a randomly initialised model as its EMA weights (no training needed)."""
    cfg = load_config(None, SMALL + overrides)
    model = perturb(build_model(cfg), seed)
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / CONFIG_FILE)
    sd = model.state_dict()
    save_checkpoint(run, 1, sd, sd, torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    return run, cfg, model.eval()


@pytest.mark.parametrize("overrides", [
    [],
    ["model.num_classes=3", "diffusion.prediction=v", "diffusion.schedule=cosine"],
    ["unet.num_heads=2", "unet.channel_mults=[1,1]", "unet.attention_resolutions=[16,8]",
     "diffusion.variance=learned_range", "diffusion.loss_type=hybrid", "diffusion.schedule=tanh"],
], ids=["paper", "classes-v-cosine", "heads-learned-variance-tanh"])
def test_exported_pipeline_unet_equals_ours_to_1e5(tmp_path, overrides):
    run, cfg, ours = _fake_run(tmp_path, overrides)
    out = export_diffusers(run, tmp_path / "exported")
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = diffusers.DDPMPipeline.from_pretrained(str(out))
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(3, 3, 16, 16, generator=g), torch.tensor([0, 417, 999])
    y = torch.tensor([0, 2, 3]) if cfg.model.num_classes else None
    with torch.no_grad():
        theirs = pipe.unet(x, t, class_labels=y).sample
        torch.testing.assert_close(theirs, ours(x, t, y), atol=1e-5, rtol=1e-5)
    # the scheduler has our betas (float32 in diffusers), prediction type and variance
    d = cfg.diffusion
    ref = make_betas(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
    torch.testing.assert_close(pipe.scheduler.betas.double(), ref, atol=1e-7, rtol=1e-5)
    assert pipe.scheduler.config.prediction_type == {"eps": "epsilon", "v": "v_prediction"}[cfg.diffusion.prediction]
    assert pipe.scheduler.config.variance_type == cfg.diffusion.variance


def test_exported_folder_imports_back_to_the_same_model_and_schedule(tmp_path):
    run, cfg, ours = _fake_run(tmp_path, ["model.num_classes=3", "diffusion.schedule=quadratic"])
    out = export_diffusers(run, tmp_path / "exported")
    cfg2, back = load_diffusers_model(out)
    for k, v in ours.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for section in ("model", "diffusion"):
        for key in ("base_channels", "channel_mults", "num_res_blocks", "attention_resolutions", "num_classes",
                    "schedule", "num_timesteps", "beta_start", "beta_end", "prediction", "variance"):
            if hasattr(getattr(cfg, section), key):
                assert getattr(getattr(cfg2, section), key) == getattr(getattr(cfg, section), key), key


def test_weight_renaming_round_trips():
    sd = UNet(base_channels=16, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(8,), norm_groups=8,
              num_classes=2, image_size=(16, 16)).state_dict()
    back = from_diffusers_state_dict(to_diffusers_state_dict(sd))
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("overrides, culprit", [
    (["unet.channel_mults=[2,2]"], r"unet\.channel_mults"),
    (["unet.num_heads=2", "unet.attention_resolutions=[16]"], r"unet\.num_heads"),  # attention at 16 and 32 ch
])
def test_export_refuses_options_that_do_not_map_naming_them(tmp_path, overrides, culprit):
    run, cfg, _ = _fake_run(tmp_path, overrides)
    with pytest.raises(DDPMError, match=culprit):
        export_diffusers(run, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_export_refuses_the_mlp():
    cfg = load_config("toy2d")
    with pytest.raises(DDPMError, match="model.kind"):
        unet2d_config(cfg)


@pytest.mark.parametrize("schedule, named", [("linear", "linear"), ("quadratic", "scaled_linear"),
                                             ("cosine", "squaredcos_cap_v2"), ("sigmoid", "sigmoid"), ("tanh", None)])
def test_scheduler_config_reproduces_our_betas_and_maps_back(schedule, named):
    cfg = load_config(None, SMALL + [f"diffusion.schedule={schedule}", "diffusion.beta_end=0.03"])
    conf = scheduler_config(cfg)
    assert conf["beta_schedule"] == (named or "linear") and ("trained_betas" in conf) == (named is None)
    sched = diffusers.DDPMScheduler(**conf)
    torch.testing.assert_close(sched.betas.double(), make_betas(schedule, 1000, 1e-4, 0.03), atol=1e-7, rtol=1e-5)
    assert diffusion_from_scheduler(conf)["schedule"] == schedule


def _diffusers_default_style_unet():
    """A UNet2DModel as diffusers' training examples build it: its defaults, not the paper's settings."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                 down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=1,
                                 norm_num_groups=8, attention_head_dim=8)  # 2 heads at 16 ch, 4 in the middle
    return perturb(unet).eval()


def test_imported_diffusers_model_with_ddim_matches_diffusers_ddim_pipeline(tmp_path):
    unet = _diffusers_default_style_unet()
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(tmp_path / "pipe"))
    cfg, ours = load_diffusers_model(tmp_path / "pipe")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the conversion itself is exact
        torch.testing.assert_close(ours(x, torch.tensor([5, 900])), unet(x, torch.tensor([5, 900])).sample,
                                   atol=1e-5, rtol=1e-5)
    steps = 10
    # diffusers' DDIM clips x0 and (with use_clipped_model_output) re-derives eps from it, as ours does
    ref = diffusers.DDIMPipeline(unet=unet, scheduler=scheduler)(
        batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps, eta=0.0,
        use_clipped_model_output=True, output_type="np").images
    x0 = generate(ours, NoiseSchedule.from_config(cfg.diffusion), (3, 16, 16), 2, sampler="ddim", steps=steps,
                  prediction=cfg.diffusion.prediction, clip_x0=1.0, seed=0, progress=False, spacing="leading")
    mine = (x0 / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(mine - ref).max() < 1e-4, abs(mine - ref).max()
    assert abs(mine - 0.5).max() > 0.1  # a real image, not a constant


def test_import_refuses_architectures_that_do_not_map_naming_the_key(tmp_path):
    unet = diffusers.UNet2DModel(sample_size=16, block_out_channels=(16, 32), down_block_types=("DownBlock2D",) * 2,
                                 up_block_types=("UpBlock2D",) * 2, layers_per_block=1, norm_num_groups=8,
                                 resnet_time_scale_shift="scale_shift")
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(str(tmp_path / "p"))
    with pytest.raises(DDPMError, match="resnet_time_scale_shift='scale_shift'"):
        load_diffusers_model(tmp_path / "p")
    conf = json.loads((tmp_path / "p/unet/config.json").read_text())
    conf.update(resnet_time_scale_shift="default", up_block_types=["AttnUpBlock2D", "UpBlock2D"])
    (tmp_path / "p/unet/config.json").write_text(json.dumps(conf))
    with pytest.raises(DDPMError, match="up_block_types.*same levels"):
        load_diffusers_model(tmp_path / "p")
    with pytest.raises(DDPMError, match="scheduler"):
        load_diffusers_model(tmp_path / "p" / "unet")  # no scheduler beside it


def test_cli_export_then_sample_from_diffusers(tmp_path, monkeypatch, capsys):
    run, cfg, _ = _fake_run(tmp_path, [])
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(run), "--format", "diffusers", "out"]) == 0
    assert "DDPMPipeline.from_pretrained" in capsys.readouterr().out
    assert main(["export", str(run), "out"]) == 2  # not empty: refused, no traceback
    assert "not empty" in capsys.readouterr().err
    assert main(["sample", "--from-diffusers", "out", "--n", "2", "--steps", "3", "--device", "cpu"]) == 0
    assert (tmp_path / "samples" / "ddim_3steps_seed0.png").is_file()
    assert main(["sample", "--n", "2"]) == 2
    assert "--from-diffusers" in capsys.readouterr().err


def test_missing_diffusers_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` raise ImportError
    with pytest.raises(DDPMError, match=r"pip install 'ddpmlab\[diffusers\]'"):
        require_diffusers()


def test_flat_folder_with_old_attention_names_loads_like_google_ddpm_checkpoints(tmp_path):
    """google/ddpm-cifar10-32 keeps config.json and scheduler_config.json side by side, and its
    attention weights under the old names query/key/value/proj_attn (diffusers renames them)."""
    from safetensors.torch import load_file, save_file

    unet = _diffusers_default_style_unet()
    unet.save_pretrained(str(tmp_path))
    diffusers.DDPMScheduler(beta_schedule="linear").save_pretrained(str(tmp_path))
    weights = tmp_path / "diffusion_pytorch_model.safetensors"
    old = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.")
           .replace("to_out.0.", "proj_attn."): v for k, v in load_file(str(weights)).items()}
    assert any(".query." in k for k in old)
    save_file(old, str(weights))
    cfg, ours = load_diffusers_model(tmp_path)
    assert cfg.diffusion.variance == "fixed_small"  # DDPMScheduler's default
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([321])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), unet(x, t).sample, atol=1e-5, rtol=1e-5)
