"""Batch layout: right-padded examples with the shifted loss mask, left-padded prompts."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from clpd_ray.data.batching import encode_examples, encode_prompts
from clpd_ray.data.example import Example
from clpd_ray.data.task import generate_examples, make_example
from clpd_ray.data.tokenizer import build_char_tokenizer

TOK = build_char_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id


def _ids(s: str) -> list[int]:
    return TOK(s, add_special_tokens=False)["input_ids"]


EXAMPLES = [
    make_example(7, [("+", 3)]),  # "7+3?" -> "7+3=0;#0"
    make_example(7, [("+", 3), ("*", 2), ("-", 4)]),
    make_example(1, [("-", 2), ("-", 2)]),
]


def test_right_padding_and_attention():
    enc = encode_examples(TOK, EXAMPLES)
    rows = [[*_ids(e.prompt), *_ids(e.target), EOS] for e in EXAMPLES]
    width = max(map(len, rows))
    assert enc.input_ids.shape == enc.attention_mask.shape == enc.loss_mask.shape == (3, width)
    assert enc.input_ids.dtype == np.int64 and enc.attention_mask.dtype == np.int64
    assert enc.loss_mask.dtype == np.bool_
    for i, row in enumerate(rows):
        n = len(row)
        assert enc.input_ids[i, :n].tolist() == row
        assert (enc.input_ids[i, n:] == PAD).all()
        assert enc.attention_mask[i].tolist() == [1] * n + [0] * (width - n)
        assert enc.input_ids[i, n - 1] == EOS


def test_loss_mask_marks_exactly_target_and_eos_predictions():
    enc = encode_examples(TOK, EXAMPLES)
    for i, e in enumerate(EXAMPLES):
        plen, n = len(_ids(e.prompt)), len(_ids(e.prompt)) + len(_ids(e.target)) + 1
        assert np.flatnonzero(enc.loss_mask[i]).tolist() == list(range(plen - 1, n - 1))
        # The token after each masked position is the target followed by eos.
        predicted = enc.input_ids[i, np.flatnonzero(enc.loss_mask[i]) + 1].tolist()
        assert predicted == [*_ids(e.target), EOS]
        assert not enc.loss_mask[i][enc.attention_mask[i] == 0].any()


def test_worked_example_layout():
    enc = encode_examples(TOK, [EXAMPLES[0]])
    text = TOK.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert text == [*"7+3?7+3=0;#0", "<eos>"]
    assert enc.loss_mask[0].tolist() == [False] * 3 + [True] * 9 + [False]


@pytest.mark.parametrize("max_length", [1, 3, 4, 5, 8, 12, 13, 100])
def test_max_length_truncates_the_target_end(max_length):
    e = EXAMPLES[0]  # prompt 4 tokens, target 8, eos: 13 in all
    full = [*_ids(e.prompt), *_ids(e.target), EOS]
    enc = encode_examples(TOK, [e], max_length=max_length)
    n = min(max_length, len(full))
    assert enc.input_ids.shape == (1, n)
    assert enc.input_ids[0].tolist() == full[:n]
    assert (EOS in enc.input_ids[0].tolist()) == (n == len(full))
    assert np.flatnonzero(enc.loss_mask[0]).tolist() == list(range(3, n - 1))


def test_many_examples_mask_counts():
    examples = generate_examples(50, 6, seed=0)
    enc = encode_examples(TOK, examples)
    assert enc.loss_mask.sum(1).tolist() == [len(e.target) + 1 for e in examples]
    assert enc.attention_mask.sum(1).tolist() == [
        len(e.prompt) + len(e.target) + 1 for e in examples
    ]


def test_empty_batch():
    enc = encode_examples(TOK, [])
    assert enc.input_ids.shape == (0, 1)
    ids, attn = encode_prompts(TOK, [])
    assert ids.shape == attn.shape == (0, 1)


def _no_pad_tokenizer(with_eos: bool = True) -> PreTrainedTokenizerFast:
    core = Tokenizer(
        models.WordLevel(vocab={"<eos>": 0, "<unk>": 1, "a": 2, "b": 3}, unk_token="<unk>")
    )
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    kw = {"eos_token": "<eos>"} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **kw)


def test_tokenizer_without_pad_pads_with_eos():
    tok = _no_pad_tokenizer()
    enc = encode_examples(tok, [Example("a", "b", "b", 1), Example("a", "bbb", "b", 1)])
    assert enc.input_ids.tolist() == [[2, 3, 0, 0, 0], [2, 3, 3, 3, 0]]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    ids, _ = encode_prompts(tok, ["a", "aab"])
    assert ids.tolist() == [[0, 0, 2], [2, 2, 3]]


def test_tokenizer_without_eos_raises():
    with pytest.raises(ValueError, match="eos"):
        encode_examples(_no_pad_tokenizer(with_eos=False), [Example("a", "b", "b", 1)])


def test_encode_prompts_left_pads():
    prompts = ["7+3?", "7+3*2-4?", "1?"]
    ids, attn = encode_prompts(TOK, prompts)
    assert ids.shape == attn.shape == (3, 8)
    assert ids.dtype == np.int64 and attn.dtype == np.int64
    for i, p in enumerate(prompts):
        k = 8 - len(p)
        assert ids[i].tolist() == [PAD] * k + _ids(p)
        assert attn[i].tolist() == [0] * k + [1] * len(p)
        assert ids[i, -1] == TOK.convert_tokens_to_ids("?")  # generation starts right after '?'


def test_encode_prompts_empty_prompt_is_all_padding():
    ids, attn = encode_prompts(TOK, ["", "12"])
    assert ids.tolist() == [[PAD, PAD], _ids("12")]
    assert attn.tolist() == [[0, 0], [1, 1]]


# --- overlong rows ----------------------------------------------------------------------------------


def test_overlong_drop_leaves_rows_out_and_says_which():
    from clpd_ray.data.prompt_format import PromptFormat

    # 13, 29 and 21 tokens: at max_length=21 the second row does not fit.
    enc = encode_examples(TOK, EXAMPLES, max_length=21, fmt=PromptFormat(), overlong="drop")
    assert enc.kept.tolist() == [0, 2]
    assert (
        enc.input_ids.tolist()
        == encode_examples(TOK, [EXAMPLES[0], EXAMPLES[2]]).input_ids.tolist()
    )
    assert encode_examples(TOK, EXAMPLES).kept.tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="overlong"):
        encode_examples(TOK, EXAMPLES, overlong="cut")


def test_fit_examples_truncates_targets_to_fit_and_counts():
    from clpd_ray.data.batching import fit_examples, tokenize_rows

    lengths = [len(ids) for ids, _ in tokenize_rows(TOK, EXAMPLES)]
    assert lengths == [13, 29, 21]
    fitted, stats = fit_examples(TOK, EXAMPLES, 16, overlong="truncate")
    assert (stats.truncated, stats.dropped, stats.longest) == (2, 0, 29)
    assert [len(ids) for ids, _ in tokenize_rows(TOK, fitted)] == [13, 16, 16]
    e = EXAMPLES[1]  # prompt 8 tokens: 7 target characters and the eos fit
    assert fitted[1] == Example(e.prompt, e.target[:7], e.answer, e.steps)
    assert fitted[0] is EXAMPLES[0]


def test_fit_examples_drop_and_prompts_that_cannot_fit():
    from clpd_ray.data.batching import fit_examples

    fitted, stats = fit_examples(TOK, EXAMPLES, 16, overlong="drop")
    assert fitted == [EXAMPLES[0]] and (stats.truncated, stats.dropped) == (0, 2)
    # A prompt of 8 tokens and the eos leave no room for a target token at 9: dropped either way.
    fitted, stats = fit_examples(TOK, EXAMPLES, 9, overlong="truncate")
    assert [len(e.target) for e in fitted] == [4, 2] and (stats.truncated, stats.dropped) == (2, 1)
    same, stats = fit_examples(TOK, EXAMPLES, None)
    assert same == EXAMPLES and (stats.truncated, stats.dropped, stats.longest) == (0, 0, None)


def test_fit_examples_on_real_text_keeps_every_row_within_the_limit():
    from pathlib import Path

    from clpd_ray.data.batching import fit_examples, tokenize_rows
    from clpd_ray.data.loaders import load_examples
    from clpd_ray.data.prompt_format import PromptFormat
    from clpd_ray.data.tokenizer import load_tokenizer

    qwen3 = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen3"
    if not (qwen3 / "tokenizer.json").is_file():
        pytest.skip("the Qwen3 tokenizer is not in ../shared")
    tok = load_tokenizer(qwen3)
    for chat in (False, True):
        fmt = PromptFormat(chat_template=chat)
        examples = load_examples(
            "sample:gsm8k/test.jsonl", prompt_field="question", cot_field="answer", chat=chat
        )[:120]
        fitted, stats = fit_examples(tok, examples, 160, fmt)
        rows = tokenize_rows(tok, fitted, fmt)
        assert max(len(ids) for ids, _ in rows) <= 160
        assert stats.truncated > 0 and len(fitted) + stats.dropped == len(examples)
        assert all(ids[-1] in fmt.stop_token_ids(tok) for ids, _ in rows)  # each ends its turn
        # Each cut target is a prefix of its original.
        originals = {e.prompt: e.target for e in examples}
        assert all(originals[e.prompt].startswith(e.target) for e in fitted)
