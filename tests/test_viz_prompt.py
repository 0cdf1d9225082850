"""`ddpm viz reverse RUN --prompt TEXT` on a text run: the prompt reaches the sampler (the last frame is what
`ddpm sample --prompt` draws from the same seed and steps, another prompt draws otherwise), several prompts draw
--n samples each, the pictures stay in colour and carry the prompt; `ddpm viz forward` reads a text run's data."""

import numpy as np
import pytest
import torch
from PIL import Image

from _text_runs import shapes_folder, train_text
from ddpmlab.cli import main
from ddpmlab.viz import commands

SAMPLING = ["--sampler", "ddim", "--steps", "3", "--seed", "5", "--guidance", "8", "--no-progress"]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("viz_prompt")
    return train_text(shapes_folder(root / "data"), root, "tiny", 30)


@pytest.fixture
def frames(monkeypatch):
    """The x_t frames (F + 1, n, C, H, W) each `ddpm viz reverse` hands to its GIF, in call order."""
    seen = []
    real = commands.save_reverse_gif

    def recording(xs, *args, **kwargs):
        seen.append(xs)
        return real(xs, *args, **kwargs)

    monkeypatch.setattr(commands, "save_reverse_gif", recording)
    return seen


def sampled(run, tmp_path, *prompts, n=2):
    out = tmp_path / f"sample{len(list(tmp_path.iterdir()))}.png"
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main(["sample", str(run), *args, "--n", str(n), *SAMPLING, "--npz", "--out", str(out)]) == 0
    return torch.from_numpy(np.load(out.with_suffix(".npz"))["samples"])


def viz_reverse(run, out, *prompts, n=2):
    args = [a for p in prompts for a in ("--prompt", p)]
    assert main(["viz", "reverse", str(run), *args, "--n", str(n), "--frames", "3", *SAMPLING, "--out", str(out)]) == 0
    return sorted(p.name for p in out.iterdir())


def test_the_last_frame_is_what_ddpm_sample_draws_for_the_prompt(text_run, tmp_path, frames):
    files = viz_reverse(text_run, tmp_path / "viz", "a red square")
    assert files == ["reverse_ddim3_a-red-square.gif", "reverse_ddim3_a-red-square.png"]
    torch.testing.assert_close(frames[-1][-1], sampled(text_run, tmp_path, "a red square"), rtol=0, atol=1e-6)
    viz_reverse(text_run, tmp_path / "other", "a green bar")
    assert (frames[-1][-1] - frames[0][-1]).abs().max() > 1e-4  # the prompt changes the sample (here by 2e-3)


def test_several_prompts_draw_n_samples_each_in_colour(text_run, tmp_path, frames):
    files = viz_reverse(text_run, tmp_path / "viz", "a red square", "a blue bar", n=2)
    assert files == ["reverse_ddim3_2prompts.gif", "reverse_ddim3_2prompts.png"]
    assert frames[-1].shape[1:] == (4, 3, 8, 8)
    torch.testing.assert_close(frames[-1][-1], sampled(text_run, tmp_path, "a red square", "a blue bar"),
                               rtol=0, atol=1e-6)
    with Image.open(tmp_path / "viz" / files[0]) as gif:
        assert gif.n_frames == 4 and gif.convert("RGB").getcolors(2 ** 16) is not None
        gif.seek(gif.n_frames - 1)
        rgb = np.asarray(gif.convert("RGB")).astype(int)
    assert np.abs(rgb[..., 0] - rgb[..., 2]).max() > 32  # a colour picture (a grey one has R = G = B)


def test_the_strip_names_the_prompts_of_its_rows():
    assert commands._prompts_title(["a red square"] * 4) == '"a red square"'
    assert commands._prompts_title(["a red square", "a blue bar", "a blue bar"]) == \
        'row 1: "a red square"; row 2: "a blue bar"'
    assert commands._prompts_title(None) is None


def test_viz_forward_reads_a_text_runs_captioned_folder(text_run, tmp_path):
    assert main(["viz", "forward", str(text_run), "--n", "2", "--t", "0,500,999", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "forward.png").is_file()
