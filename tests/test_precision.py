"""train.mixed_precision auto (bf16 only where the hardware computes it) and the learning-rate schedules."""

import math

import pytest

from ddpmlab.config import load_config
from ddpmlab.training.precision import cpu_flags, native_bf16_on_cpu, resolve_precision
from ddpmlab.training.task import learning_rate
from ddpmlab.training.tasks.diffusion import train

AVX2_EPYC = {"fpu", "sse2", "avx", "avx2", "fma", "f16c", "bmi2"}  # no AVX-512: bf16 is emulated
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}


def test_auto_is_fp32_on_a_cpu_without_native_bf16_and_bf16_where_it_has_it():
    assert resolve_precision("auto", "cpu", flags=AVX2_EPYC)[0] == "no"
    assert resolve_precision("auto", "cpu", flags=AVX2_EPYC | {"avx512f", "avx512_bf16"})[0] == "bf16"
    assert resolve_precision("auto", "cpu", flags=SAPPHIRE_RAPIDS)[0] == "bf16"
    assert resolve_precision("auto", "cpu", flags={"fp", "asimd", "bf16"})[0] == "bf16"  # Arm FEAT_BF16
    precision, why = resolve_precision("auto", "cpu", flags=AVX2_EPYC)
    assert "emulated" in why and "avx512_bf16" in why  # the first line says why
    assert native_bf16_on_cpu(None)[0] is False  # unreadable flags: the safe choice


def test_auto_on_gpus_and_explicit_modes():
    assert resolve_precision("auto", "cuda", cuda_bf16=True)[0] == "bf16"
    assert resolve_precision("auto", "cuda", cuda_bf16=False)[0] == "no"
    assert resolve_precision("auto", "mps")[0] == "no"
    for mode in ("no", "bf16", "fp16"):
        assert resolve_precision(mode, "cpu", flags=AVX2_EPYC)[0] == mode  # what the user asked for


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16\n\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n")
    assert cpu_flags(str(x86)) == {"fpu", "avx2", "avx512_bf16"}
    assert "bf16" in cpu_flags(str(arm))
    assert cpu_flags(str(tmp_path / "missing")) is None


def test_the_run_line_names_the_precision_auto_chose(tmp_path, capsys):
    cfg = load_config("toy2d", [f"train.out_dir={tmp_path}", "train.name=t", "train.steps=2", "train.sample_n=4",
                                "train.sample_steps=2", "train.device=cpu", "train.tensorboard=false"])
    train(cfg, progress=False)
    chosen, why = resolve_precision("auto", "cpu")
    assert f"({why})" in capsys.readouterr().out
    assert chosen in ("no", "bf16")


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_learning_rate_warms_up_then_follows_its_schedule(schedule):
    cfg = load_config("mnist", ["train.lr=1e-3", "train.warmup_steps=100", "train.steps=1100",
                                f"train.lr_schedule={schedule}"])
    lr = [learning_rate(cfg, s) for s in range(cfg.train.steps)]
    assert lr[0] == pytest.approx(1e-5) and lr[99] == pytest.approx(1e-3)  # linear warm-up
    assert lr[100] == pytest.approx(1e-3)  # decay starts from the peak
    middle = {"constant": 1e-3, "cosine": 0.5e-3, "linear": 0.5e-3}[schedule]
    assert lr[600] == pytest.approx(middle)
    last = {"constant": 1e-3, "cosine": 1e-3 * 0.5 * (1 + math.cos(math.pi * 999 / 1000)), "linear": 1e-6}
    assert lr[-1] == pytest.approx(last[schedule])
    if schedule != "constant":
        assert all(a >= b for a, b in zip(lr[100:], lr[101:]))  # never increases after the warm-up
