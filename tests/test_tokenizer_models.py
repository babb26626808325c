"""The char tokenizer and tiny causal LMs: round trips through save_pretrained, errors on bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from clpd_ray.config import Config, ModelSpec
from clpd_ray.data.batching import encode_prompts
from clpd_ray.data.task import TASK_ALPHABET, generate_examples
from clpd_ray.data.tokenizer import SPECIAL_TOKENS, build_char_tokenizer, load_tokenizer
from clpd_ray.distill.models import (
    build_model,
    count_parameters,
    load_causal_lm,
    make_model,
    shared_tokenizer_source,
)
from clpd_ray.errors import ClpdError, ConfigError, ModelLoadError

ARCHS = ["gpt2", "llama", "qwen2", "qwen3"]
QWEN3_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "qwen3"


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def texts():
    examples = generate_examples(40, 6, seed=1)
    return [e.prompt + e.target for e in examples] + [e.prompt for e in examples]


def _spec(arch: str, **kw) -> ModelSpec:
    return ModelSpec(arch=arch, n_layer=kw.pop("n_layer", 1), n_embd=16, n_head=2, **kw)


def _batch(tok, texts: list[str]) -> dict[str, torch.Tensor]:
    ids, attn = encode_prompts(tok, texts)  # left padded: exercises the attention mask too
    return {"input_ids": torch.as_tensor(ids), "attention_mask": torch.as_tensor(attn)}


# --- tokenizer ------------------------------------------------------------------------------------


def test_special_token_ids_and_vocab_layout(tok):
    assert (tok.pad_token, tok.eos_token, tok.unk_token) == SPECIAL_TOKENS
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == len(SPECIAL_TOKENS) + len(TASK_ALPHABET)
    vocab = tok.get_vocab()
    for i, ch in enumerate(TASK_ALPHABET):
        assert vocab[ch] == len(SPECIAL_TOKENS) + i
    assert tok.padding_side == "right"


def test_char_round_trip_is_lossless(tok, texts):
    for s in texts:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(s)  # one token per character
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == s
        assert tok.convert_ids_to_tokens(ids) == list(s)


def test_no_special_tokens_added_by_default(tok):
    assert tok("7+3?")["input_ids"] == tok("7+3?", add_special_tokens=False)["input_ids"]


def test_unknown_characters_map_to_unk(tok):
    assert tok("7x3", add_special_tokens=False)["input_ids"] == [
        tok.convert_tokens_to_ids("7"),
        tok.unk_token_id,
        tok.convert_tokens_to_ids("3"),
    ]


def test_custom_alphabet_deduplicates():
    t = build_char_tokenizer("abca")
    assert len(t) == len(SPECIAL_TOKENS) + 3
    assert t.decode(t("cab", add_special_tokens=False)["input_ids"]) == "cab"


def test_save_and_load_tokenizer_round_trip(tok, texts, tmp_path):
    tok.save_pretrained(tmp_path)
    for loaded in (load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))):
        assert loaded.get_vocab() == tok.get_vocab()
        assert len(loaded) == len(tok)
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (0, 1, 2)
        assert loaded.padding_side == "right"
        for s in texts:
            ids = tok(s, add_special_tokens=False)["input_ids"]
            assert loaded(s, add_special_tokens=False)["input_ids"] == ids
            assert loaded.decode(ids) == s
        assert (
            loaded(texts[:3], padding=True)["input_ids"]
            == tok(texts[:3], padding=True)["input_ids"]
        )


def test_load_tokenizer_without_pad_uses_eos(tmp_path):
    core = Tokenizer(models.WordLevel(vocab={"<eos>": 0, "<unk>": 1, "a": 2}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<eos>", unk_token="<unk>"
    ).save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<eos>"
    assert loaded.pad_token_id == loaded.eos_token_id == 0


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_load_tokenizer_bad_path_raises_model_load_error(tmp_path, kind):
    path = tmp_path / "no-such-tokenizer"
    if kind == "empty":
        path.mkdir()
    with pytest.raises(ModelLoadError, match="no-such-tokenizer") as info:
        load_tokenizer(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, ClpdError)


# --- models ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_build_model_forward_shape(tok, texts, arch):
    model = build_model(_spec(arch, n_layer=2), tok, seed=0).eval()
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id
    batch = _batch(tok, texts[:3])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (3, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_same_seed_same_weights_other_seed_differs(tok, arch):
    a = build_model(_spec(arch), tok, seed=3).state_dict()
    b = build_model(_spec(arch), tok, seed=3).state_dict()
    c = build_model(_spec(arch), tok, seed=4).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_build_model_leaves_global_rng_alone(tok):
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_model(_spec("gpt2"), tok, seed=0)
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_causal_lm_gives_identical_logits(tok, texts, tmp_path, arch):
    model = build_model(_spec(arch), tok, seed=1).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_causal_lm(tmp_path).eval()
    assert loaded.config.model_type == model.config.model_type
    batch = _batch(tok, texts[:4])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    # make_model with a path loads instead of building.
    via_spec = make_model(ModelSpec(path=str(tmp_path)), tok).eval()
    with torch.no_grad():
        torch.testing.assert_close(via_spec(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_make_model_without_path_builds(tok):
    a = make_model(_spec("llama"), tok, seed=2).state_dict()
    b = build_model(_spec("llama"), tok, seed=2).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_load_causal_lm_bad_path_raises_model_load_error(tmp_path, kind):
    path = tmp_path / "no-such-model"
    if kind == "empty":
        path.mkdir()
    with pytest.raises(ModelLoadError) as info:
        load_causal_lm(path)
    assert str(path) in str(info.value)


# --- real vocabularies: padded rows, dtypes, the shared tokenizer ---------------------------------


def test_qwen3_head_dim_follows_the_spec(tok):
    model = build_model(_spec("qwen3", n_layer=2), tok)
    assert model.config.model_type == "qwen3"
    assert model.config.head_dim == 16 // 2  # n_embd / n_head, not Qwen3's default 128
    assert model.config.hidden_size == 16 and model.config.num_hidden_layers == 2


@pytest.mark.parametrize("arch", ARCHS)
def test_vocab_size_pads_rows_and_generation_never_picks_them(tok, arch):
    rows = len(tok) + 13
    model = build_model(_spec(arch, vocab_size=rows), tok, seed=0).eval()
    assert model.config.vocab_size == rows
    assert model.get_input_embeddings().weight.shape[0] == rows
    # Make the padded rows win every argmax: generation must still emit real tokens only.
    with torch.no_grad():
        model.get_output_embeddings().weight[len(tok) :] *= 50.0
    batch = _batch(tok, ["7+3?", "12*2-5?"])
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[-1] == rows
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert int(out.max()) < len(tok)


def test_vocab_size_below_the_tokenizer_is_a_config_error(tok):
    with pytest.raises(ConfigError, match=rf"vocab_size={len(tok) - 1}.*{len(tok)} tokens"):
        build_model(_spec("qwen3", vocab_size=len(tok) - 1), tok)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "auto"])
def test_load_causal_lm_dtype(tok, tmp_path, dtype):
    model = build_model(_spec("qwen3"), tok, seed=1).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_causal_lm(tmp_path, dtype)
    # "auto" keeps the checkpoint's bf16; the others are what was asked for.
    want = torch.bfloat16 if dtype == "auto" else getattr(torch, dtype)
    assert {p.dtype for p in loaded.parameters()} == {want}
    assert load_causal_lm(tmp_path).dtype == torch.float32  # default: fp32, not the file's bf16
    assert make_model(ModelSpec(path=str(tmp_path)), tok, dtype="bfloat16").dtype == torch.bfloat16


def test_load_causal_lm_refuses_an_unknown_dtype(tmp_path):
    with pytest.raises(ConfigError, match="float8"):
        load_causal_lm(tmp_path, "float8")  # type: ignore[arg-type]


def _cfg(**sections) -> Config:
    return Config.model_validate(sections)


def test_shared_tokenizer_source_order():
    ladder = [{"name": "a", "path": "/m/a"}, {"name": "b"}, {"name": "c", "path": "/m/c"}]
    external = {"path": "d.jsonl"}
    assert shared_tokenizer_source(_cfg()) is None  # the embedded task's char tokenizer
    assert shared_tokenizer_source(_cfg(data=external)) is None  # nothing named: workload errs
    # A teacher path serves external data only: the embedded task keeps its own tokenizer.
    assert shared_tokenizer_source(_cfg(teachers={"ladder": ladder})) is None
    assert shared_tokenizer_source(_cfg(data=external, teachers={"ladder": ladder})) == (
        "teachers.ladder[c].path",
        "/m/c",
    )
    assert shared_tokenizer_source(
        _cfg(data=external, teachers={"ladder": ladder}, student={"tokenizer": "/t"})
    ) == ("student.tokenizer", "/t")
    assert shared_tokenizer_source(
        _cfg(data=external, student={"tokenizer": "/t", "path": "/s"})
    ) == ("student.path", "/s")


@pytest.mark.skipif(not QWEN3_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/qwen3")
def test_qwen3_model_at_the_real_vocabulary():
    qtok = load_tokenizer(QWEN3_TOKENIZER)
    assert len(qtok) == 151_669
    spec = ModelSpec(arch="qwen3", n_layer=1, n_embd=16, n_head=2, vocab_size=151_936)
    model = build_model(spec, qtok).eval()
    assert model.config.vocab_size == 151_936
    assert model.config.eos_token_id == qtok.eos_token_id
    ids = qtok(["Natalia sold clips to 48 of her friends."], return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], 151_936)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=qtok.pad_token_id)
    assert int(out.max()) < len(qtok)
