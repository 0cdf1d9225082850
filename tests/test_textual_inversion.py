"""Textual inversion (Gal et al. 2022) on tiny text runs: only the new token's row learns (every other weight and
every old row of the token embedding bit-identical to the base), the run resumes bit for bit and samples prompts
with the token; a frozen CLIP's learned embedding is what diffusers' load_textual_inversion reads; one-line
refusals (a run without text, a token the vocabulary has, an init word it lacks)."""

import numpy as np
import pytest
import torch
from _text_runs import clip_folder, finetune, one_thread_main, shapes_folder, train_text
from _util import one_line_error
from safetensors.torch import load_file

from ddpmlab.cli import main
from ddpmlab.data.tokenizer import CaptionTokenizer
from ddpmlab.models.concepts import CONCEPTS_FILE, ConceptEncoder
from ddpmlab.runs import load_run
from ddpmlab.training.tasks.finetune import finetune_run

transformers = pytest.importorskip("transformers")
TABLE = "text_encoder.token_embedding.weight"
CONCEPT = ["finetune.token=<c>", "finetune.init_token=square", "finetune.templates=['a {}','{} on black']",
           "train.steps=4", "train.lr=0.05"]


def _ckpt(run, step, part="ema"):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{part}.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 2-step own-encoder base run, three uncaptioned green squares, and their 4-step textual inversion."""
    root = tmp_path_factory.mktemp("ti")
    base = train_text(shapes_folder(root / "data"), root, "base", 2)
    few = shapes_folder(root / "few", colours=("green",) * 3, shapes=("square",), captions=False)
    assert one_thread_main(finetune(base, root, "ti", "textual-inversion", f"data.path={few}", *CONCEPT)) == 0
    return base, few, root / "ti"


def test_only_the_new_token_row_differs_from_the_base(runs):
    base, _, ti = runs
    start = _ckpt(base, 2)
    vocab = CaptionTokenizer.load(base, 12)
    grown = CaptionTokenizer.load(ti, 12)
    assert grown.vocab_size == vocab.vocab_size + 1 and grown.tokenizer.token_to_id("<c>") == vocab.vocab_size
    assert grown(["a <c> on black"])[0][0, 2].item() == vocab.vocab_size  # one token
    for part in ("model", "ema"):
        state = _ckpt(ti, 4, part)
        assert state.keys() == start.keys()
        assert all(torch.equal(state[k], start[k]) for k in start if k != TABLE), part  # bit-identical
        table = state[TABLE]
        assert table.shape[0] == start[TABLE].shape[0] + 1
        assert torch.equal(table[:-1], start[TABLE]), part  # the old rows, bit for bit
        init = start[TABLE][vocab.tokenizer.token_to_id("square")]
        assert not torch.equal(table[-1], init), part  # the new row learned (it started as square's)
    learned = load_file(str(ti / CONCEPTS_FILE))
    assert list(learned) == ["<c>"] and torch.equal(learned["<c>"], _ckpt(ti, 4)[TABLE][-1:])


def test_a_textual_inversion_run_resumes_bit_identically(runs, tmp_path, one_thread):
    base, few, straight = runs
    args = finetune(base, tmp_path, "stopped", "textual-inversion", f"data.path={few}", *CONCEPT)
    finetune_run(base, "textual-inversion", [a for a in args if "=" in a], progress=False, stop_after=2)
    assert not (tmp_path / "stopped" / CONCEPTS_FILE).exists()  # an own encoder's row is in its weights
    assert main(["finetune", "--resume", str(tmp_path / "stopped"), "--no-progress"]) == 0
    for part in ("model", "ema", "optimizer"):
        a, b = _ckpt(straight, 4, part), _ckpt(tmp_path / "stopped", 4, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_the_run_samples_prompts_that_use_the_token(runs, tmp_path, one_thread):
    _, _, ti = runs
    draw = ["--n", "2", "--sampler", "ddim", "--steps", "2", "--npz", "--no-progress"]
    assert main(["sample", str(ti), "--prompt", "a <c>", *draw, "--out", f"{tmp_path / 'c'}/"]) == 0
    assert main(["sample", str(ti), "--prompt", "a square", *draw, "--out", f"{tmp_path / 's'}/"]) == 0
    c, s = (np.load(tmp_path / d / "samples.npz")["samples"] for d in ("c", "s"))
    assert c.shape == (2, 3, 8, 8) and not np.array_equal(c, s)  # the token reads its learned row


@pytest.fixture(scope="module")
def clip_runs(tmp_path_factory):
    """A 2-step base run on a frozen tiny CLIP, and a 4-step textual inversion (the folder's captions, 'green
    square' replaced by the token), stopped after 2 steps and resumed."""
    root = tmp_path_factory.mktemp("clip")
    clip = clip_folder(root / "clip")
    base = train_text(shapes_folder(root / "data"), root, "base", 2, f"text.encoder={clip}", "text.cache=false")
    few = shapes_folder(root / "few", colours=("green",) * 3, shapes=("square",))
    args = [f"data.path={few}", "finetune.token=<c>", "finetune.init_token=square",
            "finetune.replace=[green square,square in green]", "train.steps=4", "train.lr=0.05"]
    assert one_thread_main(finetune(base, root, "ti", "textual-inversion", *args)) == 0
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finetune_run(base, "textual-inversion", args + [f"train.out_dir={root}", "train.name=stopped"],
                     progress=False, stop_after=2)
    finally:
        torch.set_num_threads(n)
    assert one_thread_main(["finetune", "--resume", str(root / "stopped"), "--no-progress"]) == 0
    return clip, base, root / "ti", root / "stopped"


def test_a_frozen_clip_learns_only_its_concept_vector_and_resumes(clip_runs):
    _, base, ti, stopped = clip_runs
    start = _ckpt(base, 2)
    for part in ("model", "ema"):
        state = _ckpt(ti, 4, part)
        assert state.keys() == start.keys() | {"text_encoder.concept_vectors"}
        assert all(torch.equal(state[k], start[k]) for k in start), part  # the denoiser bit-identical
        a, b = state, _ckpt(stopped, 4, part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part  # resumed bit for bit
    run = load_run(ti, device="cpu")  # the run folder rebuilds its ConceptEncoder from learned_embeds
    assert isinstance(run.model.text_encoder, ConceptEncoder)
    learned = load_file(str(ti / CONCEPTS_FILE))
    assert torch.equal(learned["<c>"], _ckpt(ti, 4)["text_encoder.concept_vectors"])
    assert main(["sample", str(ti), "--prompt", "a <c>", "--n", "1", "--steps", "2", "--out",
                 str(ti / "s.png"), "--no-progress"]) == 0


def test_diffusers_load_textual_inversion_reads_the_learned_embedding(clip_runs):
    """diffusers adds the token and sets its row in a resized table; the CLIP then encodes prompts with the token
    as the run's ConceptEncoder does (1e-6)."""
    diffusers = pytest.importorskip("diffusers")
    clip, _, ti, _ = clip_runs
    ours = load_run(ti, device="cpu").model.text_encoder

    class Loader(diffusers.loaders.TextualInversionLoaderMixin):
        hf_device_map, components = None, {}

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(clip), local_files_only=True)
    encoder = transformers.CLIPTextModel.from_pretrained(str(clip), local_files_only=True).eval()
    rows = encoder.get_input_embeddings().weight.shape[0]
    Loader().load_textual_inversion(str(ti / CONCEPTS_FILE), tokenizer=tokenizer, text_encoder=encoder)
    assert encoder.get_input_embeddings().weight.shape[0] == rows + 1
    prompts = ["a <c> in red", "green square", "<c>"]
    ids = tokenizer(prompts, padding="max_length", max_length=12, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = encoder(input_ids=ids)
        mine = ours(*ours.tokenize(prompts))
    assert torch.equal(ids, ours.tokenize(prompts)[0])
    torch.testing.assert_close(mine.tokens, theirs.last_hidden_state, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(mine.pooled, theirs.pooler_output, atol=1e-6, rtol=1e-6)




def test_refusals_are_one_line(runs, tmp_path, capsys):
    base, few, _ = runs
    pixel = tmp_path / "pixel"
    assert one_thread_main(["train", "--config", "mnist", "data.dataset=digits", "data.split=test",
                            "unet.base_channels=8", "unet.norm_groups=4", "unet.channel_mults=[1]",
                            "unet.attention_resolutions=[]", "train.steps=1", "train.batch_size=4",
                            "train.sample_n=1", "train.sample_steps=1", f"train.out_dir={tmp_path}",
                            "train.name=pixel", "--no-progress"]) == 0
    one_line_error(capsys, finetune(pixel, tmp_path, "a", "textual-inversion", *CONCEPT), "no text run",
                    "text.encoder null")
    data = f"data.path={few}"
    one_line_error(capsys, finetune(base, tmp_path, "b", "textual-inversion", data, *CONCEPT[1:],
                                     "finetune.token=red"), "'red' is already in the run's vocabulary")
    one_line_error(capsys, finetune(base, tmp_path, "c", "textual-inversion", data, "finetune.token=<c>",
                                     "finetune.init_token=zebra"), "finetune.init_token", "'zebra'")
    one_line_error(capsys, finetune(base, tmp_path, "d", "textual-inversion", data), "finetune.token")
    one_line_error(capsys, finetune(base, tmp_path, "e", "textual-inversion", data, *CONCEPT,
                                     "finetune.templates=[a photo]"), "'a photo' must hold '{}'")
    one_line_error(capsys, finetune(base, tmp_path, "f", "textual-inversion", data, *CONCEPT,
                                     "unet.base_channels=4"), "unet.base_channels cannot change")
