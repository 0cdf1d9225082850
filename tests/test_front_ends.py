"""The front ends agree through the run layer: outputs, devices, options and messages.

Every fault here is answered with a correct output or one line on stderr, never a traceback.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmlab.evaluate.run as evaluate_run_module
import ddpmlab.viz.commands as viz_commands
from ddpmlab.cli import build_parser, main
from ddpmlab.cli.options import NAMES as CLI_NAMES
from ddpmlab.config import load_config
from ddpmlab.demo import actions as demo
from ddpmlab.diffusion.schedules import NoiseSchedule
from ddpmlab.errors import ConfigError, OptionError
from ddpmlab.io.images import load_mask, load_picture
from ddpmlab.models import build_model
from ddpmlab.progress import SampleBar
from ddpmlab.runs import (
    CLASSES_FILE,
    RECOMMENDATION_FILE,
    Run,
    SamplingRequest,
    class_index,
    describe_classes,
    load_class_names,
    load_run,
    plan_request,
    resolve_device,
    resolve_output,
    save_class_names,
)
from ddpmlab.samplers.generate import generate
from ddpmlab.samplers.guidance import guided
from ddpmlab.samplers.registry import SAMPLER_SPECS

TINY = ["train.steps=4", "train.batch_size=8", "unet.base_channels=8", "unet.norm_groups=4",
        "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.sample_n=4",
        "train.sample_steps=2", "train.log_every=2", "train.save_every=2"]


def _err(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "data.dataset=digits", f"train.out_dir={root}", "train.name=r", "--no-progress",
                 *TINY]) == 0
    return root / "r"


def test_sample_out_as_folder_writes_one_png_per_sample_and_the_grid(run, tmp_path, capsys):
    for out in (f"{tmp_path / 'a'}/", str(tmp_path / "b")):  # a trailing slash, or a name without extension
        assert main(["sample", str(run), "--n", "3", "--steps", "2", "--out", out, "--npz", "--no-progress"]) == 0
        folder = tmp_path / out.rstrip("/").split("/")[-1]
        singles = sorted(p.name for p in folder.glob("0*.png"))
        assert singles == ["000000.png", "000001.png", "000002.png"]
        assert (folder / "grid.png").is_file()
        raw = np.load(folder / "samples.npz")["samples"]
        one = np.asarray(Image.open(folder / "000001.png"), dtype=np.float32)
        assert np.array_equal(one, np.round((np.clip(raw[1, 0], -1, 1) + 1) * 127.5))  # the PNG is the sample
    capsys.readouterr()


def test_sample_out_with_an_unknown_extension_fails_before_sampling(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("ddpmlab.cli.sampling.draw_samples",
                        lambda *a, **k: pytest.fail("sampled before checking --out"))
    rc, err = _err(capsys, ["sample", str(run), "--out", str(tmp_path / "grid.xyz")])
    assert rc == 2 and "unknown picture extension '.xyz'" in err and len(err.splitlines()) == 1


def test_raw_samples_are_written_before_the_picture(run, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("ddpmlab.cli.sampling.save_samples", broken)
    with pytest.raises(OSError):
        main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "g.png"), "--npz"])
    assert np.load(tmp_path / "g.npz")["samples"].shape == (2, 1, 8, 8)
    capsys.readouterr()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer of a machine without a CUDA GPU")
def test_an_absent_device_is_one_line_in_every_sampling_command(run, tmp_path, capsys):
    img = tmp_path / "in.png"
    Image.new("L", (8, 8), 128).save(img)
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    commands = [["sample", str(run)], ["eval", str(run)], ["viz", "grid", str(run)], ["viz", "reverse", str(run)],
                ["img2img", str(run), "--image", str(img)],
                ["inpaint", str(run), "--image", str(img), "--mask", str(tmp_path / "mask.png")],
                ["bench", "samplers", str(run)]]
    for argv in commands:
        rc, err = _err(capsys, [*argv, "--device", "cuda"])
        assert rc == 2 and "--device: 'cuda' but no CUDA GPU is visible" in err and len(err.splitlines()) == 1, argv
        rc, err = _err(capsys, [*argv, "--device", "gpu"])
        assert rc == 2 and "--device: unknown device 'gpu'" in err and "cuda:N" in err, argv


def test_resolve_device_refuses_what_is_not_there():
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device("CPU") == torch.device("cpu")
    with pytest.raises(OptionError, match="device: unknown device 'cuda:x'") as e:
        resolve_device("cuda:x")
    assert e.value.option == "device" and e.value.named({"device": "--device"}).startswith("--device: unknown")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            resolve_device("cuda:0")


def test_train_option_instead_of_a_config_key_gets_the_subcommand_usage_and_a_hint(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "100"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: ddpm train" in err
    assert "config keys are written key=value: did you mean train.steps=100?" in err
    with pytest.raises(SystemExit):
        main(["train", "--base-channels=64"])
    assert "did you mean unet.base_channels=64?" in capsys.readouterr().err


def test_train_help_lists_every_config_key_and_print_config_shows_the_resolved_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    cfg = load_config("mnist")
    for section, keys in cfg.to_dict().items():
        for key in keys if isinstance(keys, dict) else []:
            assert f"{section}.{key}" in out, f"{section}.{key} missing from ddpm train --help"
    assert main(["train", "--print-config", "train.steps=123", "unet.base_channels=48"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 123" in printed and "base_channels: 48" in printed
    assert load_config("mnist", ["train.steps=123"]).train.steps == 123  # printed, nothing trained


def test_every_sampling_command_takes_step_schedule_batch_size_and_no_progress():
    parser = build_parser()
    commands = [["sample", "R"], ["img2img", "R", "--image", "x.png"], ["eval", "R"], ["viz", "grid", "R"],
                ["viz", "reverse", "R"], ["viz", "toy", "R"], ["inpaint", "R", "--image", "x", "--mask", "m"],
                ["bench", "samplers", "R"]]
    for argv in commands:
        args = parser.parse_args([*argv, "--step-schedule", "uniform", "--batch-size", "7", "--no-progress"]
                                 if argv[0] != "bench" else [*argv, "--batch-size", "7", "--no-progress"])
        assert args.batch_size == 7 and args.no_progress, argv
        assert argv[0] == "bench" or args.step_schedule == "uniform", argv


def test_older_spellings_are_read_at_the_command_line_with_a_note_and_refused_by_the_library(capsys):
    parser = build_parser()
    for argv in (["sample", "R"], ["inpaint", "R", "--image", "x", "--mask", "m"]):
        args = parser.parse_args([*argv, "--timesteps", "leading", "--variance", "posterior"])
        assert (args.step_schedule, args.variance) == ("leading", "fixed_small"), argv
        assert capsys.readouterr().err.splitlines() == ["note: --timesteps is now spelled --step-schedule",
                                                        "note: --variance posterior is now spelled --variance "
                                                        "fixed_small"], argv
    args = parser.parse_args(["sample", "R", "--step-schedule", "karras", "--variance", "fixed_large"])
    assert (args.step_schedule, args.variance) == ("karras", "fixed_large") and capsys.readouterr().err == ""
    assert "--timesteps" not in " ".join(parser.parse_args(["sample", "R"]).parser.format_help().split())
    for alias in ("beta", "posterior", "learned"):
        with pytest.raises(OptionError, match=f"variance: unknown variance '{alias}'"):
            SamplingRequest(options={"variance": alias}).check()


def test_the_batch_size_default_is_shown_in_the_help(capsys):
    for sub in (["sample"], ["eval"], ["viz", "grid"], ["inpaint"]):
        with pytest.raises(SystemExit):
            main([*sub, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert "--batch-size BATCH_SIZE samples per batch (default" in out, sub


def test_a_picture_error_names_its_options_as_each_front_end_does(tmp_path):
    Image.new("L", (10, 12), 255).save(tmp_path / "big.png")
    with pytest.raises(OptionError) as e:
        load_picture(tmp_path / "big.png", (1, 8, 8))
    assert e.value.option == "image"
    text = str(e.value)
    assert text.startswith(f"image '{tmp_path / 'big.png'}' is 10x12 pixels") and "use resize to" in text
    cli, page = e.value.named(CLI_NAMES), e.value.named(demo.NAMES)
    assert cli.startswith("--image '") and "use --resize to scale" in cli
    assert page.startswith("image '") and "use the 'resize' box to scale" in page
    with pytest.raises(OptionError) as e:
        load_mask(tmp_path / "none.png", (8, 8))
    assert e.value.named(CLI_NAMES).startswith("--mask '") and e.value.named(demo.NAMES).startswith("mask file '")


def test_one_variance_vocabulary_aliases_give_the_same_samples(run, tmp_path, capsys):
    outs = {}
    for name in ("fixed_small", "posterior"):
        out = tmp_path / f"{name}.png"
        assert main(["sample", str(run), "--sampler", "ddpm", "--steps", "3", "--n", "2", "--variance", name,
                     "--out", str(out), "--npz", "--no-progress"]) == 0
        outs[name] = np.load(out.with_suffix(".npz"))["samples"]
    assert np.array_equal(outs["fixed_small"], outs["posterior"])
    rc, err = _err(capsys, ["sample", str(run), "--sampler", "ddpm", "--variance", "wide"])
    assert rc == 2 and "--variance: unknown variance 'wide'" in err and "fixed_large" in err
    rc, err = _err(capsys, ["sample", str(run), "--sampler", "dpmpp_2m", "--eta", "1"])
    assert rc == 2 and "--eta does not apply to sampler dpmpp_2m" in err


def test_the_ancestral_sampler_defaults_to_the_runs_variance(run):
    r = load_run(run, device="cpu")
    def plan(sampler, steps=None, **options):
        return plan_request(r, SamplingRequest(sampler, steps, options=options, cycle_classes=False))

    assert plan("ddpm", 3).options["variance"] == r.cfg.diffusion.variance
    assert plan("ddpm", 3, variance="fixed_small").options["variance"] == "fixed_small"
    assert "variance" not in plan("ddim", 3).options
    assert plan("ddpm").steps == r.T and plan("ddim").steps == 50


def test_every_sampler_spec_names_options_its_function_takes():
    import inspect

    for name, spec in SAMPLER_SPECS.items():
        params = inspect.signature(inspect.unwrap(spec.fn)).parameters
        assert spec.schedule_kind in params, name
        assert all(o in params for o in spec.options if o != "threshold"), name
        if "threshold" in spec.options:  # added by samplers.base.with_threshold around the function
            assert "threshold" in inspect.signature(spec.fn, follow_wrapped=False).parameters, name


def test_a_run_whose_only_checkpoint_is_damaged_says_so(tmp_path, capsys):
    root = tmp_path / "runs"
    assert main(["train", "data.dataset=digits", f"train.out_dir={root}", "train.name=d", "--no-progress",
                 *TINY[:-1], "train.save_every=4"]) == 0
    ckpt = root / "d" / "checkpoints" / "step_0000004"
    (ckpt / "state.json").write_text("{not json")
    rc, err = _err(capsys, ["sample", str(root / "d")])
    assert rc == 2 and "has no loadable checkpoint: step_0000004 is damaged (JSONDecodeError" in err
    assert "no checkpoint yet" not in err and len(err.splitlines()) == 1


def test_resolve_output_tells_files_from_folders(tmp_path):
    (tmp_path / "exists").mkdir()
    assert resolve_output(None, tmp_path / "d.png").picture == tmp_path / "d.png"
    assert resolve_output(tmp_path / "exists", tmp_path / "d.png").is_folder
    out = resolve_output(str(tmp_path / "x.jpg"), tmp_path / "d.png")
    assert not out.is_folder and out.raw == tmp_path / "x.npz"


def test_sample_bar_counts_samples_not_steps():
    bar = SampleBar(True, 8, 4, "test")
    for m in (5, 3):
        bar.start_batch(m)
        for _ in range(4):
            bar.step()
    assert bar.bar.total == 8 and round(bar.bar.n, 6) == 8
    bar.close()


def test_editing_commands_check_out_before_sampling(run, tmp_path, capsys, monkeypatch):
    Image.new("L", (8, 8), 128).save(tmp_path / "in.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "mask.png")
    for name in ("draw_inpainting", "edit_img2img"):
        monkeypatch.setattr(f"ddpmlab.cli.sampling.{name}", lambda *a, **k: pytest.fail("sampled before --out"))
    for argv in (["inpaint", str(run), "--mask", str(tmp_path / "mask.png")], ["img2img", str(run)]):
        rc, err = _err(capsys, [*argv, "--image", str(tmp_path / "in.png"), "--out", str(tmp_path / "row.xyz")])
        assert rc == 2 and "unknown picture extension '.xyz'" in err, argv


# ------------------------------------------------------------------------------ as the run says

GUIDED = ["--config", "mnist", "train.steps=4", "train.batch_size=8", "unet.base_channels=8", "unet.norm_groups=4",
          "unet.channel_mults=[1,2]", "unet.attention_resolutions=[]", "train.sample_n=4", "train.log_every=2",
          "train.save_every=4", "train.sample_sampler=dpmpp_2m_sde", "train.sample_steps=3", "train.sample_guidance=2"]


@pytest.fixture(scope="module")
def guided_run(tmp_path_factory):
    """A class-conditional 28x28 digit run whose own samples are DPM-Solver++(2M) SDE, 3 steps, guidance 2."""
    root = tmp_path_factory.mktemp("guided")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    assert main(["train", *GUIDED, "data.dataset=mnist", f"train.out_dir={root}", "train.name=g", "--no-progress",
                 "train.device=cpu"]) == 0
    torch.set_num_threads(n)
    return root / "g"


def _drawn_by_every_front_end(run, tmp_path, monkeypatch, n: int, seed: int) -> dict:
    """{front end: samples} of `ddpm sample`, `ddpm eval`, `ddpm viz grid` and the demo's Sample tab, each
    given only the run, n and seed (no sampler options)."""
    caught = {}

    def spy(name, module):
        real = module.draw_samples

        def draw(*args, **kwargs):
            caught[name] = real(*args, **kwargs)
            return caught[name]

        monkeypatch.setattr(module, "draw_samples", draw)

    spy("eval", evaluate_run_module)
    spy("viz", viz_commands)
    monkeypatch.setenv("DDPMLAB_CACHE", str(tmp_path / "cache"))
    same = ["--seed", str(seed), "--n", str(n), "--device", "cpu", "--no-progress"]
    assert main(["sample", str(run), *same, "--npz", "--out", str(tmp_path / "s.png")]) == 0
    caught["sample"] = torch.from_numpy(np.load(tmp_path / "s.npz")["samples"])
    assert main(["eval", str(run), *same, "--metrics", "acc", "--no-baseline", "--out", str(tmp_path / "e.json")]) == 0
    assert main(["viz", "grid", str(run), *same, "--out", str(tmp_path / "viz")]) == 0
    caught["demo"] = demo.sample(demo.Runs([run], torch.device("cpu"), tmp_path / "demo"), str(run), seed=seed, n=n).x
    return caught


def _library_draw(run_dir, sampler: str, steps: int, n: int, seed: int, **options) -> torch.Tensor:
    """The run's samples by hand: guided by its train.sample_guidance, the classes in turn (its own samples' rule)."""
    r = load_run(run_dir, device="cpu")
    model = guided(r.model, scale=float(r.cfg.train.sample_guidance))
    return generate(model, r.schedule, r.shape, n, sampler=sampler, steps=steps, seed=seed,
                    labels=torch.arange(n) % r.num_classes, prediction=r.cfg.diffusion.prediction, progress=False,
                    **options)


def test_every_front_end_samples_a_run_as_the_run_says(guided_run, tmp_path, monkeypatch, capsys, one_thread):
    caught = _drawn_by_every_front_end(guided_run, tmp_path, monkeypatch, n=6, seed=3)
    assert set(caught) == {"sample", "eval", "viz", "demo"}
    want = _library_draw(guided_run, "dpmpp_2m_sde", 3, 6, 3)  # train.sample_sampler, sample_steps, sample_guidance
    for name, x in caught.items():
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6, msg=name)
    ddim = _library_draw(guided_run, "ddim", 50, 6, 3)
    assert not torch.allclose(want, ddim, atol=1e-3)  # what ddpm eval and the demo drew before: it differs
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["guidance"] == 2.0
    capsys.readouterr()


def test_every_front_end_takes_the_runs_recommendation(guided_run, tmp_path, monkeypatch, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(guided_run, run)
    rec = {"by_nfe": {"4": {"sampler": "ddim", "timesteps": "trailing", "error_ratio": 1.1},
                      "8": {"sampler": "heun", "timesteps": None, "error_ratio": 1.5}}}
    (run / RECOMMENDATION_FILE).write_text(json.dumps(rec))
    caught = _drawn_by_every_front_end(run, tmp_path, monkeypatch, n=4, seed=1)
    want = _library_draw(run, "ddim", 4, 4, 1, spacing="trailing")  # the NFE with the lowest error
    for name, x in caught.items():
        torch.testing.assert_close(x, want, rtol=0, atol=1e-6, msg=name)
    capsys.readouterr()


# ------------------------------------------------------------------------------ classes by name

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def test_a_class_is_asked_for_by_name_or_index_everywhere(guided_run, tmp_path, capsys, one_thread):
    run = tmp_path / "run"
    shutil.copytree(guided_run, run)
    assert save_class_names(run, DIGITS) == run / CLASSES_FILE and load_class_names(run) == DIGITS
    same = ["--n", "2", "--sampler", "ddim", "--steps", "2", "--device", "cpu", "--no-progress", "--npz"]
    for label, out in (("three", "name.png"), ("3", "index.png")):
        assert main(["sample", str(run), "--class", label, *same, "--out", str(tmp_path / out)]) == 0
    by_name, by_index = (np.load(tmp_path / f"{k}.npz")["samples"] for k in ("name", "index"))
    assert np.array_equal(by_name, by_index)
    capsys.readouterr()
    # the listing, and an unknown name: one line with the valid names
    assert main(["sample", str(run), "--class", "list"]) == 0
    assert "0 zero, 1 one, 2 two" in capsys.readouterr().out
    rc, err = _err(capsys, ["sample", str(run), "--class", "cat", "--device", "cpu"])
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--class 'cat' is not a class of this run; this run's classes are 0 zero, 1 one" in err and "9 nine" in err
    # the Python API and the demo: the same class by name
    r = load_run(run, device="cpu")
    plan = plan_request(r, SamplingRequest("ddim", 2, label="seven", n=2), log=lambda m: None)
    assert plan.label == 7 and plan.labels.tolist() == [7, 7] and r.describe_classes().startswith("0 zero, 1 one")
    runs = demo.Runs([run], torch.device("cpu"), tmp_path / "demo")
    x = demo.sample(runs, str(run), sampler="ddim", steps=2, n=2, label="three").x
    assert np.array_equal(x.numpy(), by_name)
    assert demo.class_choices(runs, str(run))[:3] == [(demo.ALL_CLASSES, ""), ("0 zero", "zero"), ("1 one", "one")]
    assert "classes: 0 zero, 1 one" in demo.run_info(runs, str(run))[0]


def test_a_run_without_class_names_takes_indices_and_says_so(guided_run, capsys):
    rc, err = _err(capsys, ["sample", str(guided_run), "--class", "cat", "--device", "cpu"])
    assert rc == 2 and "--class 'cat' is not a class of this run" in err and "give an index 0..9" in err
    rc, err = _err(capsys, ["sample", str(guided_run), "--class", "10", "--device", "cpu"])
    assert rc == 2 and "--class 10 is out of range: this model knows classes 0..9" in err
    assert main(["sample", str(guided_run), "--class", "list"]) == 0
    assert "0..9 (it stores no class names: --class takes an index)" in capsys.readouterr().out
    toy = load_config("toy2d")
    unconditional = Run(toy, build_model(toy), NoiseSchedule.from_config(toy.diffusion), torch.device("cpu"))
    assert unconditional.describe_classes() == "" and unconditional.class_names == []
    with pytest.raises(OptionError, match="class needs a class-conditional model"):
        unconditional.class_index("3")


def test_class_names_files_and_lookups():
    assert class_index(None, DIGITS, 10) is None
    assert class_index("two", DIGITS, 10) == class_index("2", DIGITS, 10) == class_index(2, [], 10) == 2
    # a name wins over an index: folders '10' and '2' sorted as strings are labels 0 and 1
    assert class_index("2", ["10", "2"], 2) == 1 and class_index(1, ["10", "2"], 2) == 1
    with pytest.raises(OptionError, match="needs a class-conditional model") as e:
        class_index("two", [], 0)
    assert e.value.option == "class"
    assert describe_classes(DIGITS[:2], 2) == "0 zero, 1 one" and describe_classes([], 3) == "0..2"


def test_a_damaged_classes_file_is_ignored_with_a_warning(tmp_path):
    (tmp_path / CLASSES_FILE).write_text("{not json")
    with pytest.warns(UserWarning, match="classes are taken by index only"):
        assert load_class_names(tmp_path) == []
    assert load_class_names(tmp_path / "no-such-run") == [] and save_class_names(tmp_path, []) is None
