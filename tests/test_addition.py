"""The second embedded task (multi-digit addition with carries as CoT): every chain checked by an
independent evaluator, problem indices cover each problem once, held-out problems are disjoint
from training at every difficulty, and a run config selects it by ``task.name``."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from clpd_ray.data.addition import ADDITION, add_columns, generate_examples, make_example
from clpd_ray.data.example import Example, extract_answer
from clpd_ray.data.task import TASK_ALPHABET, TASKS, held_out_split, synthetic_task


def _reference(prompt: str) -> tuple[list[str], int]:
    """Independent evaluator: the schoolbook column sums of 'A+B?' as 'x+y+c=s' strings."""
    a, b = prompt[:-1].split("+")
    steps, carry = [], 0
    for i in range(len(a) - 1, -1, -1):
        s = int(a[i]) + int(b[i]) + carry
        steps.append(f"{a[i]}+{b[i]}+{carry}={s}")
        carry = 1 if s >= 10 else 0
    return steps, int(a) + int(b)


def _check(ex: Example) -> None:
    steps, total = _reference(ex.prompt)
    cot, sep, final = ex.target.rpartition("#")
    assert sep == "#" and final == ex.answer == str(total)
    assert cot[:-1].split(";") == steps and cot.endswith(";")
    assert ex.steps == len(steps) == len(ex.prompt[:-1].split("+")[0])
    assert extract_answer(ex.target) == ex.answer


def test_docstring_example():
    ex = make_example("357", "468")
    assert ex == Example(
        prompt="357+468?", target="7+8+0=15;5+6+1=12;3+4+1=8;#825", answer="825", steps=3
    )
    assert add_columns("99", "01") == ("9+1+0=10;9+0+1=10;", 100)
    with pytest.raises(ValueError, match="one length"):
        add_columns("12", "3")


@pytest.mark.parametrize("split", ["train", "eval", "probe"])
def test_every_generated_chain_is_right(split):
    examples = generate_examples(600, 6, seed=4, split=split)
    assert Counter(e.steps for e in examples) == {k: 100 for k in range(1, 7)}
    for ex in examples:
        _check(ex)
        assert set(ex.prompt + ex.target) <= set(TASK_ALPHABET)
    assert generate_examples(600, 6, seed=4, split=split) == examples  # deterministic by seed
    assert generate_examples(600, 6, seed=5, split=split) != examples


def test_carries_happen_and_leading_zeros_are_kept():
    examples = generate_examples(3000, 4, seed=0)
    assert any("+1=" in e.target for e in examples)  # a carry in
    assert any(e.prompt.startswith("0") for e in examples)
    assert any(len(e.answer) == e.steps + 1 for e in examples)  # a carry out of the top column


@pytest.mark.parametrize("k", [1, 2])
def test_problem_space_and_index_cover_every_problem_once(k):
    numbers = ["".join(d) for d in itertools.product("0123456789", repeat=k)]
    prompts = [f"{a}+{b}?" for a in numbers for b in numbers]
    assert ADDITION.space(k) == len(prompts) == 100**k
    indices = [ADDITION.index(p) for p in prompts]
    assert {kk for kk, _ in indices} == {k}
    assert sorted(i for _, i in indices) == list(range(len(prompts)))
    assert [ADDITION.from_index(k, i).prompt for _, i in indices] == prompts


@pytest.mark.parametrize("bad", ["", "?", "12+3?", "12+34", "1a+34?", "7+3*2?", "+?"])
def test_index_rejects_what_is_not_an_addition_prompt(bad):
    with pytest.raises(ValueError, match="not an addition prompt"):
        ADDITION.index(bad)


@pytest.mark.parametrize(
    ("train_size", "max_difficulty", "eval_size"), [(20000, 6, 3000), (500, 3, 90)]
)
def test_held_out_problems_are_disjoint_from_training_at_every_difficulty(
    train_size, max_difficulty, eval_size
):
    train = generate_examples(train_size, max_difficulty, 0, "train")
    held = held_out_split(train, max_difficulty, eval_size, eval_size // 2, 0, task=ADDITION)
    trained = {e.prompt for e in train}
    ev, pr = [e.prompt for e in held.eval], [e.prompt for e in held.probe]
    assert len(set(ev)) == len(ev) == eval_size and len(set(pr)) == len(pr) == eval_size // 2
    assert not set(ev) & trained and not set(pr) & trained and not set(ev) & set(pr)
    for e in [*held.eval, *held.probe]:
        _check(e)
    # k=1 has 100 problems, most or all of them in training: it is "seen", never evaluated.
    assert held.seen == (1,) and held.levels == tuple(range(2, max_difficulty + 1))
    assert held.unseen[1] == 100 - len({e.prompt for e in train if e.steps == 1})
    assert set(Counter(e.steps for e in held.eval)) == set(held.levels)


def test_levels_beyond_int64_are_drawn_too():
    # 100**10 problems at k=10 is more than int64 holds; modchain passes it at k=13.
    for task, k in ((ADDITION, 10), (synthetic_task("modchain"), 13)):
        assert task.space(k) >= 2**63
        train = task.generate(40, k, 0, "train")
        held = held_out_split(train, k, 20, 10, 0, task=task)
        assert {e.steps for e in held.eval} <= set(range(1, k + 1))
        assert max(e.steps for e in held.eval) == k


def test_the_config_names_the_task():
    from clpd_ray.config import TaskConfig, config_from_dict
    from clpd_ray.errors import ConfigError
    from clpd_ray.workload import load_data

    assert set(TASKS) == set(TaskConfig.model_fields["name"].annotation.__args__)
    config = config_from_dict(
        {"task": {"name": "addition", "max_difficulty": 3, "train_size": 600, "eval_size": 60}}
    )
    train, held_out, probe, stats = load_data(config)
    assert train == generate_examples(600, 3, 0, "train")
    for e in [*train, *held_out, *probe]:
        _check(e)
    assert stats["seen_difficulties"] == [1]
    with pytest.raises(ConfigError, match=r"task\.name"):
        config_from_dict({"task": {"name": "subtraction"}})
    with pytest.raises(ValueError, match="unknown task 'subtraction'"):
        synthetic_task("subtraction")


def test_the_default_task_keeps_its_teacher_cache_keys():
    # Adding task.name must not retrain anyone's cached modchain ladder: the default name stays
    # out of the key; another task gets keys of its own.
    from clpd_ray.config import config_from_dict
    from clpd_ray.distill.ladder import teacher_cache_key

    base = config_from_dict({})
    spec = base.teachers.ladder[0]
    named = config_from_dict({"task": {"name": "modchain"}})
    other = config_from_dict({"task": {"name": "addition"}})
    assert teacher_cache_key(named, spec) == teacher_cache_key(base, spec)
    assert teacher_cache_key(other, spec) != teacher_cache_key(base, spec)
