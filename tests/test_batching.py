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
