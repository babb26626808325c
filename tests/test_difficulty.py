"""Difficulty scorers against independent references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import rankdata, spearmanr
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from clpd_ray.curriculum.difficulty import (
    count_steps,
    length_scores,
    rank_fusion,
    step_scores,
    student_loss_scores,
)
from clpd_ray.data.example import Example

GSM8K_TEST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]


def _char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character; unknown characters map to <unk>."""
    vocab = {tok: i for i, tok in enumerate(["<pad>", "<eos>", "<unk>", *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _char_tokenizer()


def _examples() -> list[Example]:
    return [
        Example("Question: 2+3?\nAnswer: ", "2+3=5\n#### 5", "5", 1),
        Example("Q: 7*6?\nA: ", "7*6=42\nso 42\n#### 42", "42", 2),
        Example("Question: a long one, 1+1+1+1?\nAnswer: ", "1+1=2\n2+1=3\n3+1=4\n#### 4", "4", 3),
        Example("Q?", "#1", "1", 1),
        Example("Question: x\nAnswer: ", "x is 9; then 9\n#### 9", "9", 1),
    ]


def test_char_tokenizer_is_one_token_per_char(tokenizer):
    text = "a b\n#### 5"
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == len(text)
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


# --- static signals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cot", "lines", "calc"),
    [
        ("a <<1+1=2>>2\nb <<2*2=4>>4\n#### 4", 2, 2),
        ("one step\n\n   \n#### 7\n", 1, 1),  # blank lines ignored, no calc -> min 1
        ("#### 3", 1, 1),  # only an answer line -> min 1
        ("x\ny\nz", 3, 1),  # no answer line: every line counts
        ("#1 refers back\nthen more", 2, 1),  # a '#' line that is not last is a step
        ("<<a>><<b>><<c>>\n#4", 1, 3),
    ],
)
def test_count_steps(cot, lines, calc):
    assert count_steps(cot) == count_steps(cot, "lines") == lines
    assert count_steps(cot, "calc") == calc


def test_count_steps_bad_mode():
    with pytest.raises(ValueError, match="mode='words'"):
        count_steps("x", "words")  # type: ignore[arg-type]


def test_step_scores():
    got = step_scores(_examples())
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [1, 2, 3, 1, 1])
    assert step_scores([]).shape == (0,)


def test_length_scores_counts_target_tokens(tokenizer):
    examples = _examples()
    got = length_scores(examples, tokenizer)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, [len(e.target) for e in examples])
    assert length_scores([], tokenizer).shape == (0,)


# --- student loss ---------------------------------------------------------------------------------


def _tiny_gpt2(tokenizer) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1,
        n_embd=16,
        n_head=2,
        n_positions=128,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _direct_nll(model, tokenizer, example: Example) -> float:
    """Mean NLL of target + eos given prompt, one unpadded example at a time."""
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    target = tokenizer(example.target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([[*prompt, *target, tokenizer.eos_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)  # (T, V)
    total = 0.0
    for pos in range(len(prompt), ids.shape[1]):  # each target token and the eos
        total -= float(logp[pos - 1, ids[0, pos]])
    return total / (len(target) + 1)


def test_student_loss_scores_matches_direct_computation(tokenizer):
    model = _tiny_gpt2(tokenizer)
    model.train()  # scoring must switch dropout off, then restore the mode
    examples = _examples()
    got = student_loss_scores(model, tokenizer, examples, batch_size=2)
    assert model.training
    model.eval()
    want = np.array([_direct_nll(model, tokenizer, e) for e in examples])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Batch size and batch composition do not change the scores.
    np.testing.assert_allclose(
        student_loss_scores(model, tokenizer, examples, batch_size=64), got, atol=1e-5
    )
    assert student_loss_scores(model, tokenizer, []).shape == (0,)
    with pytest.raises(ValueError, match="batch_size=0"):
        student_loss_scores(model, tokenizer, examples, batch_size=0)


def test_student_loss_reflects_what_the_model_learned(tokenizer):
    """A model trained on one target scores it lower than an unrelated one."""
    model = _tiny_gpt2(tokenizer)
    seen = Example("Q: ", "abcabcabc", "x", 1)
    unseen = Example("Q: ", "zyxwvutsr", "x", 1)
    ids = torch.tensor(
        [tokenizer(seen.prompt + seen.target, add_special_tokens=False)["input_ids"]]
    )
    for _ in range(5):  # plain SGD: a cold torch.optim import can cost seconds
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 1.0 * p.grad
    seen_nll, unseen_nll = student_loss_scores(model, tokenizer, [seen, unseen])
    assert seen_nll < unseen_nll


# --- rank fusion -----------------------------------------------------------------------------------


def test_rank_fusion_matches_scipy():
    rng = np.random.default_rng(0)
    a = rng.integers(1, 6, size=40).astype(float)  # many ties
    b = rng.normal(size=40)
    for w in (0.0, 0.3, 0.5, 1.0):
        want = w * (rankdata(a) - 1) / 39 + (1 - w) * (rankdata(b) - 1) / 39
        np.testing.assert_allclose(rank_fusion(a, b, weight=w), want)


def test_rank_fusion_properties():
    got = rank_fusion([1, 2, 3], [30, 20, 10])
    np.testing.assert_allclose(got, [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rank_fusion([5, 5, 5], [1, 2, 3], weight=1.0), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rank_fusion([1.0, 100.0], [0.1, 0.2]), [0.0, 1.0])
    np.testing.assert_allclose(rank_fusion([3.0], [4.0]), [0.5])
    assert rank_fusion([], []).shape == (0,)


@pytest.mark.parametrize(
    ("a", "b", "weight", "match"),
    [
        ([1, 2], [1, 2, 3], 0.5, "equal length"),
        ([1, 2], [1, 2], 1.5, "weight=1.5"),
        ([1, np.nan], [1, 2], 0.5, "NaN"),
    ],
)
def test_rank_fusion_errors(a, b, weight, match):
    with pytest.raises(ValueError, match=match):
        rank_fusion(a, b, weight)


# --- real GSM8K ------------------------------------------------------------------------------------


def test_gsm8k_longer_cot_has_more_steps(tokenizer):
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K not present at {GSM8K_TEST}")
    from clpd_ray.data.loaders import load_examples

    examples = load_examples(GSM8K_TEST, prompt_field="question", cot_field="answer")[:300]
    rho = spearmanr(step_scores(examples), length_scores(examples, tokenizer)).statistic
    assert rho > 0.3, rho
