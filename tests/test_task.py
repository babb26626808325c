"""The embedded synthetic task: determinism, split streams, difficulty balance, CoT correctness,
and held-out problems disjoint from training at every difficulty."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from clpd_ray.data.example import Example, extract_answer
from clpd_ray.data.task import (
    OPERATORS,
    TASK_ALPHABET,
    TooFewProblems,
    generate_examples,
    held_out_split,
    make_example,
    problem_index,
    problem_space,
    solve,
)


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


# -- held-out problems ------------------------------------------------------------------------


def _all_prompts(k: int) -> list[str]:
    """Every problem of difficulty k, enumerated independently of the task module."""
    pairs = [op + d for op in "+-*" for d in "0123456789"]
    return [s + "".join(p) + "?" for s in "0123456789" for p in itertools.product(pairs, repeat=k)]


@pytest.mark.parametrize("k", [1, 2])
def test_problem_space_and_index_cover_every_problem_once(k):
    prompts = _all_prompts(k)
    assert problem_space(k) == len(prompts) == 10 * 30**k  # 300 at k=1, 9,000 at k=2
    indices = [problem_index(p) for p in prompts]
    assert {kk for kk, _ in indices} == {k}
    assert sorted(i for _, i in indices) == list(range(len(prompts)))


@pytest.mark.parametrize("bad", ["", "?", "7+?", "7/3?", "x+3?", "7+a?"])
def test_problem_index_rejects_what_is_not_a_prompt(bad):
    with pytest.raises(ValueError, match="not an embedded-task prompt"):
        problem_index(bad)


def _check_disjoint(train, held, max_difficulty, eval_size, probe_size):
    train_by_k: dict[int, set[str]] = {}
    for e in train:
        train_by_k.setdefault(e.steps, set()).add(e.prompt)
    ev, pr = [e.prompt for e in held.eval], [e.prompt for e in held.probe]
    assert (len(ev), len(pr)) == (eval_size, probe_size)
    assert len(set(ev)) == len(ev) and len(set(pr)) == len(pr)  # deduplicated on the prompt
    assert not set(ev) & set(pr)  # evaluation and probe sets are disjoint too
    for k in range(1, max_difficulty + 1):
        trained = train_by_k.get(k, set())
        ev_k = {e.prompt for e in held.eval if e.steps == k}
        pr_k = {e.prompt for e in held.probe if e.steps == k}
        assert not ev_k & trained, f"k={k}: evaluation problems in training"
        assert not pr_k & trained, f"k={k}: probe problems in training"
        if k <= 2:  # small enough to count independently
            assert held.unseen[k] == len(_all_prompts(k)) - len(trained)
        if k in held.seen:
            assert not ev_k and not pr_k
    assert set(held.levels) | set(held.seen) == set(range(1, max_difficulty + 1))
    assert not set(held.levels) & set(held.seen)
    counts = Counter(e.steps for e in held.eval)
    assert set(counts) == set(held.levels)
    assert max(counts.values()) - min(counts.values()) <= 1  # balanced over held-out levels
    for e in [*held.eval, *held.probe]:
        _check_example(e)


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize(
    ("train_size", "max_difficulty", "eval_size", "probe_size"),
    [(300, 3, 30, 60), (2000, 4, 400, 200), (6000, 2, 120, 60), (900, 6, 3000, 1500)],
)
def test_held_out_problems_are_disjoint_from_training_at_every_difficulty(
    seed, train_size, max_difficulty, eval_size, probe_size
):
    train = generate_examples(train_size, max_difficulty, seed, "train")
    held = held_out_split(train, max_difficulty, eval_size, probe_size, seed)
    _check_disjoint(train, held, max_difficulty, eval_size, probe_size)
    again = held_out_split(train, max_difficulty, eval_size, probe_size, seed)
    assert (again.eval, again.probe) == (held.eval, held.probe)  # deterministic by seed


def test_the_demo_size_marks_k1_seen_and_holds_out_the_rest():
    # 20,000 rows hold all 300 k=1 problems: k=1 cannot be held out (the published evaluation
    # set had all 100 of its k=1 problems, and 24 of 100 k=2, in training).
    train = generate_examples(20000, 6, 0, "train")
    assert {e.prompt for e in train if e.steps == 1} == set(_all_prompts(1))
    held = held_out_split(train, 6, 3000, 1500, 0)
    assert (held.seen, held.levels) == ((1,), (2, 3, 4, 5, 6))
    assert held.unseen[1] == 0
    _check_disjoint(train, held, 6, 3000, 1500)
    assert Counter(e.steps for e in held.eval) == {k: 600 for k in range(2, 7)}  # >= 500 each


def test_a_level_with_too_few_unseen_problems_is_seen():
    # 6,000 rows over k=1..2 leave no unseen k=1 problem; asking 2 x 5,000 rows of k=2 (9,000
    # problems, ~3,900 unseen) is more than k=2 can give without repeats: nothing can be held out.
    train = generate_examples(6000, 2, 0, "train")
    with pytest.raises(TooFewProblems, match="no difficulty level"):
        held_out_split(train, 2, 5000, 5000, 0)
    held = held_out_split(train, 2, 500, 100, 0)
    assert (held.seen, held.levels) == ((1,), (2,))


def test_exclude_keeps_more_prompts_out():
    train = generate_examples(300, 2, 0, "train")
    first = held_out_split(train, 2, 40, 20, 0)
    second = held_out_split(train, 2, 40, 20, 1, exclude=[e.prompt for e in first.eval])
    assert not {e.prompt for e in second.eval} & {e.prompt for e in first.eval}


def test_the_embedded_workload_holds_out_by_construction():
    from clpd_ray.config import config_from_dict
    from clpd_ray.errors import ConfigError
    from clpd_ray.workload import load_data

    config = config_from_dict({"task": {"max_difficulty": 3, "train_size": 3000, "eval_size": 90}})
    train, held_out, probe, stats = load_data(config)
    # The training rows are the "train" stream, exactly as before held-out problems were drawn.
    assert train == generate_examples(3000, 3, 0, "train")
    assert stats["seen_difficulties"] == [1] and stats["held_out_difficulties"] == [2, 3]
    assert (stats["eval_rows"], stats["probe_rows"]) == (90, 60) == (len(held_out), len(probe))
    trained = {e.prompt for e in train}
    assert not trained & {e.prompt for e in [*held_out, *probe]}
    assert {e.steps for e in held_out} == {e.steps for e in probe} == {2, 3}

    too_small = config_from_dict({"task": {"max_difficulty": 1, "train_size": 3000}})
    with pytest.raises(ConfigError, match=r"task\.train_size"):
        load_data(too_small)
