"""The embedded synthetic task: determinism, split streams, difficulty balance, CoT correctness."""

from __future__ import annotations

from collections import Counter

import pytest

from clpd_ray.data.example import Example, extract_answer
from clpd_ray.data.task import OPERATORS, TASK_ALPHABET, generate_examples, make_example, solve


def _reference_solve(prompt: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """Independent evaluator: parse 'd(op d)*?' and return the (a, op, b, a op b mod 10) steps."""
    assert prompt.endswith("?"), prompt
    body = prompt[:-1]
    assert len(body) % 2 == 1, prompt
    value = int(body[0])
    steps = []
    for i in range(1, len(body), 2):
        op, b = body[i], int(body[i + 1])
        if op == "+":
            nxt = (value + b) % 10
        elif op == "-":
            nxt = (value - b) % 10
        elif op == "*":
            nxt = (value * b) % 10
        else:
            raise AssertionError(f"unknown operator {op!r} in {prompt!r}")
        steps.append((value, op, b, nxt))
        value = nxt
    return steps, value


def _check_example(ex: Example) -> None:
    steps, value = _reference_solve(ex.prompt)
    cot, sep, final = ex.target.rpartition("#")
    assert sep == "#", ex.target
    assert final == str(value) == ex.answer
    assert cot.endswith(";")
    written = cot[:-1].split(";")
    assert len(written) == len(steps) == ex.steps
    assert ex.target.count(";") == ex.steps
    for text, (a, op, b, c) in zip(written, steps, strict=True):
        assert text == f"{a}{op}{b}={c}"
    assert extract_answer(ex.target) == ex.answer


def test_docstring_example():
    ex = make_example(7, [("+", 3), ("*", 2), ("-", 4)])
    assert ex == Example(prompt="7+3*2-4?", target="7+3=0;0*2=0;0-4=6;#6", answer="6", steps=3)
    assert solve(7, [("+", 3), ("*", 2), ("-", 4)]) == ("7+3=0;0*2=0;0-4=6;", 6)


def test_subtraction_wraps_to_non_negative():
    ex = make_example(2, [("-", 9)])
    assert ex.target == "2-9=3;#3"
    _check_example(ex)


@pytest.mark.parametrize("split", ["train", "eval", "probe"])
def test_cot_is_correct_for_generated_examples(split):
    examples = generate_examples(300, 6, seed=3, split=split)
    assert len(examples) == 300
    for ex in examples:
        _check_example(ex)
        assert set(ex.prompt + ex.target) <= set(TASK_ALPHABET)


def test_all_operators_and_digits_appear():
    examples = generate_examples(300, 4, seed=0)
    ops = Counter(ex.prompt[i] for ex in examples for i in range(1, len(ex.prompt) - 1, 2))
    assert set(ops) == set(OPERATORS)
    starts = {ex.prompt[0] for ex in examples}
    assert starts == set("0123456789")


def test_deterministic_by_seed():
    a = generate_examples(50, 5, seed=11, split="eval")
    b = generate_examples(50, 5, seed=11, split="eval")
    assert a == b
    assert generate_examples(50, 5, seed=12, split="eval") != a


def test_streams_differ_between_splits():
    by_split = {s: generate_examples(60, 5, seed=0, split=s) for s in ("train", "eval", "probe")}
    assert by_split["train"] != by_split["eval"]
    assert by_split["train"] != by_split["probe"]
    assert by_split["eval"] != by_split["probe"]
    # Not just a reordering: the prompt multisets differ as well.
    prompts = {s: Counter(e.prompt for e in v) for s, v in by_split.items()}
    assert prompts["train"] != prompts["eval"] != prompts["probe"]


@pytest.mark.parametrize(("n", "max_difficulty"), [(600, 6), (7, 3), (10, 1), (25, 16)])
def test_difficulty_balanced_over_1_to_n(n, max_difficulty):
    counts = Counter(ex.steps for ex in generate_examples(n, max_difficulty, seed=5))
    assert sum(counts.values()) == n
    assert set(counts) <= set(range(1, max_difficulty + 1))
    expected_levels = min(n, max_difficulty)
    assert len(counts) == expected_levels
    assert max(counts.values()) - min(counts.values()) <= 1


def test_difficulties_are_shuffled():
    steps = [ex.steps for ex in generate_examples(60, 6, seed=0)]
    assert steps != sorted(steps)
    assert steps != [i % 6 + 1 for i in range(60)]


def test_bad_split_raises():
    with pytest.raises(ValueError, match="'test'"):
        generate_examples(10, 3, seed=0, split="test")
