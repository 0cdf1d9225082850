"""Text encoders: the run's own (GLIDE's transformer) and frozen Hugging Face ones read from a local folder that
transformers itself writes here (tiny and random: nothing is downloaded), equal to calling transformers directly;
bad folders and long prompts; the caption-embedding cache, reused and invalidated."""

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ddpmlab.data.text_cache import cached_text_embeddings
from ddpmlab.errors import ConfigError
from ddpmlab.models.text import OwnTextEncoder, build_text_encoder, run_tokenizer
from ddpmlab.models.text_condition import TextCondition
from ddpmlab.models.text_frozen import load_text_encoder

transformers = pytest.importorskip("transformers")
WORDS = ["a", "red", "blue", "one", "circle", "square", "top", "left"]
PROMPTS = ["a red circle", "", "blue square top left", "one"]


def _clip_tokenizer_files(folder: Path) -> dict:
    """A tiny CLIP BPE vocabulary (characters, end-of-word characters, the WORDS merged), written as Stable
    Diffusion's tokenizer/ folder is: vocab.json, merges.txt, tokenizer_config.json."""
    folder.mkdir(parents=True)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {c: i for i, c in enumerate(letters)}
    vocab.update({c + "</w>": len(letters) + i for i, c in enumerate(letters)})
    merges = []
    for word in WORDS[1:]:
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            merges.append(f"{parts[0]} {parts[1]}")
            parts = [parts[0] + parts[1]] + parts[2:]
            vocab.setdefault(parts[0], len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer",
                                                              "model_max_length": 16, **special}))
    return vocab


@pytest.fixture(scope="module")
def clip_pipeline(tmp_path_factory):
    """A Stable-Diffusion-like folder: text_encoder/ (CLIPTextModel) and tokenizer/."""
    root = tmp_path_factory.mktemp("sd")
    vocab = _clip_tokenizer_files(root / "tokenizer")
    eos = vocab["<|endoftext|>"]
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                         projection_dim=24, bos_token_id=vocab["<|startoftext|>"], eos_token_id=eos,
                                         pad_token_id=eos)
    torch.manual_seed(0)
    transformers.CLIPTextModel(config).save_pretrained(root / "text_encoder")
    torch.manual_seed(1)
    projected = root / "projected"
    transformers.CLIPTextModelWithProjection(config).save_pretrained(projected)
    for f in (root / "tokenizer").iterdir():
        (projected / f.name).write_bytes(f.read_bytes())
    return root


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory):
    """A T5EncoderModel with a word-level fast tokenizer (tokenizer.json) in one folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    folder = tmp_path_factory.mktemp("t5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>", model_max_length=32)
    torch.manual_seed(2)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    transformers.T5EncoderModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _direct(kind, folder: Path, tok_folder: Path, texts, length):
    """What calling transformers directly gives: the tokenizer padded to ``length``, then the model."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tok_folder), local_files_only=True)
    model = getattr(transformers, kind).from_pretrained(str(folder), local_files_only=True).eval()
    batch = tok(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        if kind == "T5EncoderModel":
            return model(**batch).last_hidden_state, batch["attention_mask"].bool(), None
        out = model(input_ids=batch["input_ids"])  # as Stable Diffusion calls it
        pooled = out.text_embeds if kind == "CLIPTextModelWithProjection" else out.pooler_output
        every = torch.ones(out.last_hidden_state.shape[:2], dtype=torch.bool)  # SD's UNet reads every token
        return out.last_hidden_state, every, pooled


@pytest.mark.parametrize("kind", ["CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"])
def test_frozen_encoder_equals_calling_transformers_directly(kind, clip_pipeline, t5_folder):
    path = {"CLIPTextModel": clip_pipeline, "CLIPTextModelWithProjection": clip_pipeline / "projected",
            "T5EncoderModel": t5_folder}[kind]
    enc = load_text_encoder(path, max_length=12)
    out = enc.encode(PROMPTS)
    assert isinstance(out, TextCondition)
    tokens, mask, pooled = out.tokens, out.mask, out.pooled
    folder = clip_pipeline / "text_encoder" if kind == "CLIPTextModel" else path
    tok_folder = clip_pipeline / "tokenizer" if kind == "CLIPTextModel" else path
    want = _direct(kind, folder, tok_folder, PROMPTS, 12)
    assert enc.kind == kind and tokens.shape == (4, 12, 32) and enc.width == 32
    assert torch.equal(tokens, want[0]) and torch.equal(mask, want[1])
    if kind == "T5EncoderModel":
        assert pooled is None and enc.pooled_width is None
    else:
        assert torch.equal(pooled, want[2]) and pooled.shape == (4, enc.pooled_width)
        assert enc.pooled_width == (24 if kind == "CLIPTextModelWithProjection" else 32)
    # the empty prompt: T5 reads its special token; Stable Diffusion's UNet reads CLIP's padding too
    assert mask[1].sum() == (1 if kind == "T5EncoderModel" else 12)
    assert not any(p.requires_grad for p in enc.parameters())
    assert not enc.train().model.training  # frozen: no dropout whatever the denoiser does


def test_a_prompt_longer_than_the_context_is_truncated_with_a_one_line_warning(clip_pipeline):
    enc = load_text_encoder(clip_pipeline, max_length=6)
    with pytest.warns(UserWarning, match=r"has 10 tokens but the text encoder .* reads 6: truncated") as caught:
        out = enc.encode(["red blue red blue red blue red blue", "one"])
    tokens, mask = out.tokens, out.mask
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert tokens.shape[1] == 6 and mask[0].all()
    with pytest.raises(ConfigError, match=r"text.max_length=20 is more than .* reads \(16 tokens\)"):
        load_text_encoder(clip_pipeline, max_length=20)


def test_a_folder_that_is_not_a_text_encoder_is_one_line_error(tmp_path, clip_pipeline):
    cases = [(tmp_path / "missing", "does not exist"), (tmp_path, "has no config.json")]
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    cases.append((tmp_path / "vae", "holds a model of no named kind, not a text encoder"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                               "architectures": ["BertModel"]}))
    cases.append((tmp_path / "bert", "holds a BertModel, not a text encoder"))
    notok = tmp_path / "notok"
    notok.mkdir()
    for f in (clip_pipeline / "text_encoder").iterdir():
        (notok / f.name).write_bytes(f.read_bytes())
    cases.append((notok, "has no tokenizer"))
    for path, why in cases:
        with pytest.raises(ConfigError) as e:
            load_text_encoder(path)
        msg = str(e.value)
        assert f"text.encoder '{path}' {why}" in msg and "CLIPTextModel, CLIPTextModelWithProjection or " \
            "T5EncoderModel" in msg and "\n" not in msg, msg


def _text_section(**keys):
    """The keys of the config's text section that build_text_encoder reads."""
    return SimpleNamespace(**{"encoder": "own", "max_length": 8, "vocab_size": 100, "width": 32, "depth": 2,
                              "heads": 4, "pooling": "eos", **keys})


def test_own_encoder_shapes_mask_and_pooled_eos_token(tmp_path):
    cfg = SimpleNamespace(text=_text_section())
    captions = [("a red circle", "red circle"), ("a blue square top left",)]
    torch.manual_seed(0)
    enc = build_text_encoder(cfg.text, tmp_path, captions)
    assert isinstance(enc, OwnTextEncoder) and (tmp_path / "tokenizer.json").is_file() and enc.trainable
    out = enc.encode(["a red circle", "", "blue square"])
    assert isinstance(out, TextCondition)
    tokens, mask, pooled = out.tokens, out.mask, out.pooled
    assert tokens.shape == (3, 8, 32) and pooled.shape == (3, 32)
    assert mask.sum(1).tolist() == [5, 2, 4]
    assert torch.equal(pooled, tokens[torch.arange(3), mask.sum(1) - 1])  # the [EOS] token's output
    # padding changes nothing: one prompt alone equals it in a batch, at any padding length
    alone = enc.encode(["blue square"])
    assert torch.allclose(alone.tokens[0, :4], tokens[2, :4], atol=1e-6)
    tokens.sum().backward()  # trained with the denoiser
    assert enc.token_embedding.weight.grad is not None
    # a resumed run reads its tokenizer back, whatever captions it is given
    again = run_tokenizer(cfg.text, tmp_path, [("other words entirely",)])
    assert again.identity == enc.tokenizer.identity


def test_own_encoder_mean_pooling_averages_the_real_tokens(tmp_path):
    """text.pooling=mean (Imagen's): the pooled embedding is the mean of the real tokens' outputs, padding
    excluded, so a prompt pools the same alone and in a batch with longer ones."""
    captions = [("a red circle", "red circle"), ("a blue square top left",)]
    torch.manual_seed(0)
    enc = build_text_encoder(_text_section(pooling="mean"), tmp_path, captions)
    out = enc.encode(["a red circle", "blue square top left", ""])
    for i, n in enumerate(out.mask.sum(1).tolist()):
        assert torch.allclose(out.pooled[i], out.tokens[i, :n].mean(0), atol=1e-6)
    alone = enc.encode(["a red circle"])
    assert torch.allclose(alone.pooled[0], out.pooled[0], atol=1e-5)
    with pytest.raises(ValueError, match="text.pooling='max'"):
        build_text_encoder(_text_section(pooling="max"), tmp_path, captions)


def test_own_encoder_of_depth_zero_reads_each_token_alone(tmp_path):
    """text.depth=0: no transformer block, each token's output is the layer norm of its embedding and place's
    alone (a bag of words), whatever the other words are."""
    captions = [("a red circle", "red circle"), ("a blue square top left",)]
    torch.manual_seed(0)
    enc = build_text_encoder(_text_section(depth=0, pooling="mean"), tmp_path, captions)
    assert len(enc.blocks) == 0
    a, b = enc.encode(["a red circle", "a blue circle"]).tokens
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3]) and not torch.allclose(a[2], b[2])  # [BOS] a . circle
    ids, _ = enc.tokenize(["a red circle"])
    manual = torch.nn.functional.layer_norm(enc.token_embedding(ids[0, 2]) + enc.positional_embedding[2], (32,),
                                            enc.final_ln.weight, enc.final_ln.bias)
    assert torch.allclose(a[2], manual, atol=1e-6)


def test_own_encoder_needs_its_tokenizer_or_captions(tmp_path):
    cfg = SimpleNamespace(text=_text_section())
    with pytest.raises(ConfigError, match="tokenizer.json' does not exist"):
        build_text_encoder(cfg.text, tmp_path)
    cfg.text.encoder = None
    with pytest.raises(ConfigError, match="text.encoder is null"):
        build_text_encoder(cfg.text, tmp_path)


class _Counting:
    """A frozen encoder that counts the texts it encodes."""

    def __init__(self, encoder):
        self.encoder, self.identity, self.calls = encoder, encoder.identity, 0

    def encode(self, texts):
        self.calls += len(texts)
        return self.encoder.encode(texts)


def test_embedding_cache_is_reused_and_equals_encoding(tmp_path, clip_pipeline):
    enc = _Counting(load_text_encoder(clip_pipeline, max_length=8))
    captions = [("a red circle", "one"), ("blue square",), ("one",)]
    emb, path, hit = cached_text_embeddings(enc, captions, tmp_path)
    assert not hit and path.parent == tmp_path / "text" and path.is_file()
    assert emb.captions == ["", "a red circle", "blue square", "one"] and enc.calls == 4
    again, path2, hit2 = cached_text_embeddings(enc, list(reversed(captions)), tmp_path)
    assert hit2 and path2 == path and enc.calls == 4  # read, not encoded
    tokens, mask, pooled = again.lookup(["blue square", ""])
    want = enc.encoder.encode(["blue square", ""])  # another batch: equal up to float32 rounding
    assert torch.allclose(tokens, want.tokens, atol=1e-5) and torch.equal(mask, want.mask)
    assert torch.allclose(pooled, want.pooled, atol=1e-5)
    with pytest.raises(KeyError, match="not in the embedding cache: 'green'"):
        again.rows(["green"])


def test_embedding_cache_is_invalidated_by_captions_weights_tokenizer_and_damage(tmp_path, clip_pipeline):
    first = load_text_encoder(clip_pipeline, max_length=8)
    captions = [("a red circle",)]
    _, path, _ = cached_text_embeddings(first, captions, tmp_path)
    assert cached_text_embeddings(first, [("a red circle", "one")], tmp_path)[1] != path  # new captions
    assert cached_text_embeddings(load_text_encoder(clip_pipeline, max_length=7), captions, tmp_path)[1] != path
    changed = tmp_path / "changed"
    for sub in ("text_encoder", "tokenizer"):
        (changed / sub).mkdir(parents=True)
        for f in (clip_pipeline / sub).iterdir():
            (changed / sub / f.name).write_bytes(f.read_bytes())
    same = load_text_encoder(changed, max_length=8)
    assert cached_text_embeddings(same, captions, tmp_path)[1:] == (path, True)  # a copy: the same key
    model = transformers.CLIPTextModel.from_pretrained(str(changed / "text_encoder"))
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if n.endswith("final_layer_norm.bias")).add_(1.0)
    model.save_pretrained(changed / "text_encoder")  # other weights
    emb, new_path, hit = cached_text_embeddings(load_text_encoder(changed, max_length=8), captions, tmp_path)
    assert new_path != path and not hit
    assert not torch.equal(emb.tokens, cached_text_embeddings(first, captions, tmp_path)[0].tokens)
    tok_cfg = changed / "tokenizer" / "tokenizer_config.json"
    tok_cfg.write_text(json.dumps({**json.loads(tok_cfg.read_text()), "model_max_length": 15}))  # another tokenizer
    assert cached_text_embeddings(load_text_encoder(changed, max_length=8), captions, tmp_path)[1] not in (path,
                                                                                                           new_path)
    path.write_bytes(b"damaged")  # a damaged entry is recomputed and rewritten
    emb, path3, hit3 = cached_text_embeddings(first, captions, tmp_path)
    assert path3 == path and not hit3 and cached_text_embeddings(first, captions, tmp_path)[2]


def test_t5_without_pooled_embedding_caches_none(tmp_path, t5_folder):
    enc = load_text_encoder(t5_folder, max_length=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of
        emb, _, _ = cached_text_embeddings(enc, [("a red circle",)], tmp_path)
        again, _, hit = cached_text_embeddings(enc, [("a red circle",)], tmp_path)
    assert hit and again.pooled is None and emb.pooled is None
    assert torch.equal(again.lookup(["a red circle"])[0], enc.encode(["a red circle"]).tokens)
