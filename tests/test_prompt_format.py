"""Prompt format (plain / chat template), the natural prompt-target boundary, and generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from clpd_ray.config import config_from_dict
from clpd_ray.data.batching import encode_examples, encode_prompts, tokenize_rows
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.loaders import load_examples
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.distill.training import evaluate_accuracy, generate_texts
from clpd_ray.errors import ConfigError

QWEN3 = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen3"
CHAT = PromptFormat(chat_template=True)
SPECIALS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _chat_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, and chat markers as special tokens."""
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for ch in map(chr, range(32, 127)):
        vocab.setdefault(ch, len(vocab))
    vocab["\n"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIALS[3:],
    )
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def qwen3():
    if not (QWEN3 / "tokenizer.json").is_file():
        pytest.skip(f"the Qwen3 tokenizer is not at {QWEN3}")
    from clpd_ray.data.tokenizer import load_tokenizer

    return load_tokenizer(QWEN3)


# --- the format ----------------------------------------------------------------------------------


def test_from_config():
    cfg = config_from_dict({"data": {"chat_template": True, "system_prompt": "Be brief."}})
    assert PromptFormat.from_config(cfg) == PromptFormat(True, "Be brief.")
    assert PromptFormat.from_config(config_from_dict({})) == PromptFormat()


def test_system_prompt_without_chat_template_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.system_prompt.*data\.chat_template: true"):
        config_from_dict({"data": {"system_prompt": "Be brief."}})


def test_plain_format_is_the_text_as_given():
    tok = build_char_tokenizer()
    fmt = PromptFormat()
    assert fmt.prompt_text(tok, "7+3?") == "7+3?"
    assert fmt.full_text(tok, "7+3?", "7+3=0;#0") == "7+3?7+3=0;#0"
    assert fmt.end_text(tok) == ""
    assert fmt.stop_token_ids(tok) == [tok.eos_token_id]


def test_plain_format_gives_the_same_batches_as_before():
    """The embedded task's rows: prompt ids, target ids, eos; loss from the last prompt token."""
    tok = build_char_tokenizer()
    examples = generate_examples(40, 6, seed=3)
    enc = encode_examples(tok, examples, fmt=PromptFormat())
    for i, e in enumerate(examples):
        p = tok(e.prompt, add_special_tokens=False)["input_ids"]
        t = tok(e.target, add_special_tokens=False)["input_ids"]
        row = [*p, *t, tok.eos_token_id]
        assert enc.input_ids[i, : len(row)].tolist() == row
        assert np.flatnonzero(enc.loss_mask[i]).tolist() == list(range(len(p) - 1, len(row) - 1))


def test_chat_format_turns_and_end_marker():
    tok = _chat_tokenizer()
    fmt = PromptFormat(chat_template=True, system_prompt="S")
    assert fmt.prompt_text(tok, "Q?") == "<|system|>S<|end|><|user|>Q?<|end|><|assistant|>"
    assert fmt.end_text(tok) == "<|end|>"
    assert fmt.full_text(tok, "Q?", "A") == fmt.prompt_text(tok, "Q?") + "A<|end|>"
    assert fmt.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|end|>"), tok.eos_token_id]
    assert CHAT.prompt_text(tok, "Q?") == "<|user|>Q?<|end|><|assistant|>"  # no system turn


def test_chat_loss_is_on_the_assistant_tokens_and_end_marker_only():
    tok = _chat_tokenizer()
    fmt = PromptFormat(chat_template=True, system_prompt="sys")
    examples = [Example("What is 2+3?", "2+3=5\n#### 5", "5", 1), Example("Hi", "x", "x", 1)]
    enc = encode_examples(tok, examples, fmt=fmt)
    end = tok.convert_tokens_to_ids("<|end|>")
    for i, e in enumerate(examples):
        pos = np.flatnonzero(enc.loss_mask[i])
        predicted = enc.input_ids[i, pos + 1].tolist()
        assert predicted == [*tok(e.target, add_special_tokens=False)["input_ids"], end]
        prompt_ids = tok(fmt.prompt_text(tok, e.prompt), add_special_tokens=False)["input_ids"]
        assert enc.input_ids[i, : len(prompt_ids)].tolist() == prompt_ids
        assert pos[0] == len(prompt_ids) - 1  # the first scored position is the last prompt token
        assert tok.eos_token_id not in enc.input_ids[i][enc.attention_mask[i] == 1].tolist()


def test_chat_without_a_template_is_a_config_error():
    tok = build_char_tokenizer()
    with pytest.raises(ConfigError, match=r"data\.chat_template.*no chat template"):
        CHAT.prompt_text(tok, "7+3?")
    with pytest.raises(ConfigError, match=r"data\.chat_template"):
        encode_examples(tok, [Example("1?", "#1", "1", 1)], fmt=CHAT)
    PromptFormat().check(tok)  # the plain format needs no template


def test_a_template_that_rejects_the_system_turn_is_a_config_error():
    tok = _chat_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('no system role') }}"
        "{% endif %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}"
    )
    fmt = PromptFormat(chat_template=True, system_prompt="S")
    with pytest.raises(ConfigError, match=r"no system role.*drop data\.system_prompt"):
        fmt.prompt_text(tok, "Q")
    assert CHAT.prompt_text(tok, "Q") == "<|user|>Q<|end|>"


def test_a_token_across_the_boundary_counts_as_target():
    """A tokenizer that merges 'ab' across the prompt/target split scores the merged token."""
    core = Tokenizer(
        models.WordLevel(vocab={"<eos>": 0, "<unk>": 1, "a": 2, "b": 3, "ab": 4}, unk_token="<unk>")
    )
    core.pre_tokenizer = pre_tokenizers.Split(Regex("ab|."), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", unk_token="<unk>")
    enc = encode_examples(tok, [Example("aa", "bb", "b", 1)])
    assert enc.input_ids[0].tolist() == [2, 4, 3, 0]  # "a" "ab" "b" eos
    assert enc.loss_mask[0].tolist() == [True, True, True, False]


# --- the real Qwen3 tokenizer (skipped without ../shared) ---------------------------------------


def test_qwen3_plain_gsm8k_boundary_is_natural(qwen3):
    examples = load_examples(
        "sample:gsm8k/train.jsonl", prompt_field="question", cot_field="answer"
    )
    ids, n = tokenize_rows(qwen3, examples[:1])[0]
    assert examples[0].target.startswith(" Natalia")
    assert qwen3.convert_ids_to_tokens(ids[n - 2 : n + 2]) == ["Answer", ":", "ĠNatal", "ia"]
    # Generation starts from exactly the training prefix, for every sample row.
    rows = tokenize_rows(qwen3, examples)
    prompts = qwen3([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    assert all(p == ids[:n] for p, (ids, n) in zip(prompts, rows, strict=True))
    assert {ids[-1] for ids, _ in rows} == {qwen3.eos_token_id}


def test_qwen3_chat_template(qwen3):
    examples = load_examples(
        "sample:gsm8k/train.jsonl", prompt_field="question", cot_field="answer", chat=True
    )[:200]
    fmt = PromptFormat(chat_template=True, system_prompt="Solve step by step.")
    e = examples[0]
    prompt = fmt.prompt_text(qwen3, e.prompt)
    # Qwen3's template with enable_thinking=False: an empty think block the model continues after.
    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt.startswith(
        "<|im_start|>system\nSolve step by step.<|im_end|>\n<|im_start|>user\n"
    )
    # The training text is the template's own rendering of the whole conversation.
    own = qwen3.apply_chat_template(
        fmt.messages(e.prompt, e.target), tokenize=False, enable_thinking=False
    )
    assert fmt.full_text(qwen3, e.prompt, e.target) == own.rstrip("\n")
    im_end = qwen3.convert_tokens_to_ids("<|im_end|>")
    assert fmt.stop_token_ids(qwen3) == [im_end]
    rows = tokenize_rows(qwen3, examples, fmt)
    ids_p, _ = encode_prompts(qwen3, [x.prompt for x in examples], fmt)
    for (ids, n), x, padded in zip(rows, examples, ids_p, strict=True):
        assert padded[padded.size - n :].tolist() == ids[:n]  # generation prefix = training prefix
        assert qwen3.decode(ids[n:]) == x.target + "<|im_end|>"
        assert ids[-1] == im_end


# --- generation ----------------------------------------------------------------------------------


class _ScriptedLM(torch.nn.Module):
    """Stands in for a causal LM: ``generate`` appends a fixed continuation to every row."""

    def __init__(self, continuation: list[int]):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.continuation = continuation
        self.calls: list[dict] = []

    def generate(self, input_ids, attention_mask, **kw):
        self.calls.append({"input_ids": input_ids, **kw})
        tail = torch.tensor(self.continuation).expand(input_ids.shape[0], -1)
        return torch.cat([input_ids, tail], dim=1)


def test_generation_uses_the_format_and_stops_at_the_end_marker():
    tok = _chat_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    end = tok.convert_tokens_to_ids("<|end|>")
    model = _ScriptedLM([*ids("#### 5"), end, *ids("junk"), tok.eos_token_id])
    texts = generate_texts(model, tok, ["2+3?", "Q"], max_new_tokens=12, fmt=CHAT)
    assert texts == ["#### 5", "#### 5"]
    (call,) = model.calls
    config = call["generation_config"]
    assert config.eos_token_id == [end, tok.eos_token_id]
    assert config.max_new_tokens == 12 and config.do_sample is False
    # The prompts went in formatted, left-padded (grouped by length: "Q" first).
    row = call["input_ids"][1].tolist()
    assert row == ids(CHAT.prompt_text(tok, "2+3?"))


def test_generation_cuts_at_eos_in_plain_format():
    tok = build_char_tokenizer()
    model = _ScriptedLM(
        [*tok("1+1=2;#2", add_special_tokens=False)["input_ids"], tok.eos_token_id, 5, 6]
    )
    assert generate_texts(model, tok, ["1+1?"], max_new_tokens=20) == ["1+1=2;#2"]


def _tiny_gpt2(tok) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    eos = tok.eos_token_id
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    return GPT2LMHeadModel(cfg).eval()


def test_a_checkpoints_generation_defaults_do_not_change_greedy_decoding():
    tok = build_char_tokenizer()
    model = _tiny_gpt2(tok)
    prompts = ["1+2?", "3*4-5?"]
    greedy = generate_texts(model, tok, prompts, max_new_tokens=8)
    model.generation_config.do_sample = True
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.temperature = 3.0
    assert generate_texts(model, tok, prompts, max_new_tokens=8) == greedy


def test_sampling_is_reproducible_by_seed_and_leaves_the_global_rng_alone():
    tok = build_char_tokenizer()
    model = _tiny_gpt2(tok)
    prompts = ["1+2?", "3*4-5?", "7?"]
    state = torch.get_rng_state()
    a = generate_texts(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    b = generate_texts(model, tok, prompts, max_new_tokens=8, do_sample=True, seed=1)
    c = generate_texts(
        model, tok, prompts, max_new_tokens=8, do_sample=True, seed=2, temperature=5.0
    )
    greedy = generate_texts(model, tok, prompts, max_new_tokens=8)
    assert a == b
    assert c != a  # 24 sampled characters at temperature 5 agree by chance with odds below 1e-20
    assert greedy == generate_texts(model, tok, prompts, max_new_tokens=8)


def test_evaluate_accuracy_returns_predictions():
    tok = build_char_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    model = _ScriptedLM([*ids("1+1=2;#2"), tok.eos_token_id])
    examples = [Example("1+1?", "1+1=2;#2", "2", 1), Example("2+1?", "2+1=3;#3", "3", 1)]
    out = evaluate_accuracy(model, tok, examples, extractor=AnswerExtractor("number"))
    assert out["accuracy"] == 0.5 and out["n"] == 2 and out["by_difficulty"] == {1: 0.5}
    assert out["predictions"] == [
        {
            "prompt": "1+1?",
            "generation": "1+1=2;#2",
            "extracted": "2",
            "gold": "2",
            "correct": True,
            "full_chain": True,
            "steps": 1,
        },
        {
            "prompt": "2+1?",
            "generation": "1+1=2;#2",
            "extracted": "2",
            "gold": "3",
            "correct": False,
            "full_chain": False,
            "steps": 1,
        },
    ]
    # The budget is the longest target + 2, as before.
    assert model.calls[0]["generation_config"].max_new_tokens == len("1+1=2;#2") + 2


def test_qwen3_generation_with_a_tiny_real_vocabulary_model(qwen3):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=151936,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=512,
        eos_token_id=qwen3.eos_token_id,
        pad_token_id=qwen3.pad_token_id,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    examples = load_examples(
        "sample:gsm8k/test.jsonl", prompt_field="question", cot_field="answer", chat=True
    )[:3]
    fmt = PromptFormat(chat_template=True)
    out = evaluate_accuracy(model, qwen3, examples, max_new_tokens=6, fmt=fmt)
    assert out["n"] == 3 and len(out["predictions"]) == 3
    for p, e in zip(out["predictions"], examples, strict=True):
        assert p["prompt"] == e.prompt and p["gold"] == e.answer
        assert p["correct"] is (p["extracted"] == e.answer)
        # At most 6 new tokens, none of them the end-of-turn marker.
        ids = qwen3(p["generation"], add_special_tokens=False)["input_ids"]
        assert len(ids) <= 8 and "<|im_end|>" not in p["generation"]
