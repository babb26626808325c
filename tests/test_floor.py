"""The floor (best constant answer) and full-chain exact match, on hand-made examples and against
independent counts; how they reach evaluate_accuracy's result, the run table and the ablation
statistics (no Ray, no model: generations are given)."""

from __future__ import annotations

import itertools

import pytest

from clpd_ray.ablation.stats import (
    REACH,
    curve_auc,
    floor_of,
    learning_curves,
    mean_ci,
    steps_to,
)
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.task import generate_examples, held_out_split
from clpd_ray.distill import training
from clpd_ray.distill.training import answer_floor, chain_matches, evaluate_accuracy
from clpd_ray.errors import ClpdError


def _ex(answer: str, steps: int = 1, target: str | None = None, prompt: str = "p") -> Example:
    return Example(prompt=prompt, target=target or f"#{answer}", answer=answer, steps=steps)


def test_floor_is_the_most_common_answers_share():
    examples = [_ex(a) for a in ["0", "3", "0", "5", "0", "3"]]
    assert answer_floor(examples) == (0.5, "0")


def test_floor_ties_go_to_the_smallest_answer_whatever_the_order():
    answers = ["7", "2", "7", "2", "9"]
    for order in itertools.permutations(answers):
        assert answer_floor([_ex(a) for a in order]) == (0.4, "2")


def test_floor_counts_answers_as_the_checker_reads_them():
    examples = [_ex(a) for a in ["72.0", "72", "1,000", "1000", "1000", "5"]]
    assert answer_floor(examples) == (pytest.approx(2 / 6), "1000")  # raw strings
    norm = AnswerExtractor().normalise
    assert answer_floor(examples, norm) == (pytest.approx(3 / 6), "1000")
    # An answer the checker cannot read counts in the denominator but is never a floor answer.
    unreadable = [_ex("n/a"), _ex("n/a"), _ex("n/a"), _ex("4")]
    assert answer_floor(unreadable, lambda a: None if a == "n/a" else a) == (0.25, "4")


def test_floor_of_no_examples():
    assert answer_floor([]) == (0.0, None)


def test_floor_of_the_task_against_an_independent_count():
    # Every k=1 problem, solved here without the task module: "0" is the most common answer
    # (multiplication by 0, 2, 4, 5, 6, 8 lands on 0 often), with the share counted directly.
    answers = []
    for start, op, b in itertools.product(range(10), "+-*", range(10)):
        value = {"+": start + b, "-": start - b, "*": start * b}[op] % 10
        answers.append(str(value))
    expected = answers.count("0") / len(answers)
    examples = [
        Example(prompt=f"{s}{op}{b}?", target="", answer=a, steps=1)
        for (s, op, b), a in zip(
            itertools.product(range(10), "+-*", range(10)), answers, strict=True
        )
    ]
    share, answer = answer_floor(examples)
    assert answer == "0" and share == pytest.approx(expected)
    assert share > max(answers.count(str(d)) for d in range(1, 10)) / len(answers)


def test_floor_of_a_held_out_set_is_well_above_a_tenth():
    train = generate_examples(2000, 6, 0, "train")
    held = held_out_split(train, 6, 600, 300, 0)
    share, answer = answer_floor(held.eval)
    assert answer == "0" and 0.12 < share < 0.3  # the sceptic's 0.14-0.18, not 0.10


@pytest.mark.parametrize(
    ("generation", "target", "match"),
    [
        ("7+3=0;#0", "7+3=0;#0", True),
        ("  7+3=0;\n#0 ", "7+3=0; #0", True),  # ends stripped, a newline is whitespace
        ("7+3=0;#0", "7+3=0; #0", False),  # a space inside is not nothing
        ("7+3=0;  #0", "7+3=0; #0", True),  # runs of whitespace count as one
        ("7+3=0;\t#0\n", "7+3=0; #0", True),
        ("7+3=1;#0", "7+3=0;#0", False),  # right answer, wrong chain
        ("7+3=0;#0;", "7+3=0;#0", False),
        ("", "", True),
    ],
)
def test_chain_matches(generation, target, match):
    assert chain_matches(generation, target) is match


def test_evaluate_accuracy_reports_full_chain_and_floor(monkeypatch):
    examples = [
        Example("1+1?", "1+1=2;#2", "2", 1),
        Example("2*5?", "2*5=0;#0", "0", 1),
        Example("3*0+4?", "3*0=0;0+4=4;#4", "4", 2),
        Example("5*2-0?", "5*2=0;0-0=0;#0", "0", 2),
    ]
    generations = {
        "1+1?": "1+1=2;#2",  # right chain, right answer
        "2*5?": "2*5=1;#0",  # a wrong chain that lands on the right answer
        "3*0+4?": "3*0=0;0+4=4;#5",  # wrong answer
        "5*2-0?": "5*2=0; 0-0=0; #0",  # right, written with spaces: no full-chain match
    }

    def fake_generate(model, tokenizer, prompts, **kwargs):
        return [generations[p] for p in prompts]

    monkeypatch.setattr(training, "generate_texts", fake_generate)
    out = evaluate_accuracy(None, None, examples, max_new_tokens=8)  # type: ignore[arg-type]
    assert out["accuracy"] == 0.75 and out["by_difficulty"] == {1: 1.0, 2: 0.5}
    assert out["full_chain"] == 0.25 and out["full_chain_by_difficulty"] == {1: 0.5, 2: 0.0}
    assert [p["full_chain"] for p in out["predictions"]] == [True, False, False, False]
    assert (out["floor"], out["floor_answer"]) == (0.5, "0")
    assert out["floor_by_difficulty"] == {1: 0.5, 2: 0.5}
    assert {"accuracy", "by_difficulty", "n", "predictions"} <= out.keys()  # kept


def test_run_table_shows_full_chain_and_floor():
    from clpd_ray.cli import _table

    student = {
        "accuracy": 0.5,
        "accuracy_by_difficulty": {"2": 0.6, "3": 0.4},
        "n": 10,
        "parameters": 100,
        "full_chain": 0.2,
        "full_chain_by_difficulty": {"2": 0.3, "3": 0.1},
        "floor": 0.15,
        "floor_answer": "0",
        "floor_by_difficulty": {"2": 0.2, "3": 0.1},
    }
    lines = _table({"student": student, "teachers": {}}).splitlines()
    assert lines[2].split() == ["student", "100", "0.50", "0.60", "0.40"]
    assert lines[3].split() == ["full", "chain", "0.20", "0.30", "0.10"]
    assert lines[4].split() == ["floor", "'0'", "0.15", "0.20", "0.10"]  # per level: its own best


# -- the ablation's view: one floor per evaluation set, learning curves ----------------------


def test_floor_of_rows():
    rows = [{"floor": 0.2, "floor_answer": "0"}, {"floor": 0.2, "floor_answer": "0"}, {}]
    assert floor_of(rows) == {"floor": 0.2, "answer": "0"}
    assert floor_of([{}, {"floor": None}]) is None
    with pytest.raises(ClpdError, match="different floors"):
        floor_of([{"floor": 0.2, "floor_answer": "0"}, {"floor": 0.25, "floor_answer": "0"}])


def test_curve_auc_and_steps_to():
    curve = [[100, 0.1], [200, 0.3], [400, 0.5]]
    # Trapezoids: 100 x 0.2 + 200 x 0.4 = 100, over a span of 300 steps.
    assert curve_auc(curve) == pytest.approx(100 / 300)
    assert curve_auc([[50, 0.4]]) == 0.4 and curve_auc([]) is None
    assert steps_to(curve, 0.3) == 200 and steps_to(curve, 0.05) == 100
    assert steps_to(curve, 0.6) is None


def test_learning_curves_band_over_seeds():
    rows = [
        {"arm": "clpd", "seed": 0, "curve": [[10, 0.1], [20, 0.3]]},
        {"arm": "clpd", "seed": 1, "curve": [[10, 0.2], [20, 0.5]]},
        {"arm": "clpd", "seed": 2, "curve": [[10, 0.3], [20, 0.4]]},
        {"arm": "sft", "seed": 0, "curve": [[10, 0.0], [20, 0.2]]},
        {"arm": "old", "seed": 0},  # a run without eval.jsonl: no curve
    ]
    curves = learning_curves(rows, ["clpd", "sft", "old"])
    assert list(curves) == ["clpd", "sft"]
    c = curves["clpd"]
    assert c["steps"] == [10, 20] and c["n"] == [3, 3]
    for i, values in enumerate([[0.1, 0.2, 0.3], [0.3, 0.5, 0.4]]):
        mean, ci = mean_ci(values)
        assert c["mean"][i] == pytest.approx(mean) and c["ci95"][i] == pytest.approx(ci)
    assert c["auc"]["values"] == pytest.approx([0.2, 0.35, 0.35])
    assert curves["sft"]["ci95"] == [None, None]  # one seed: no band
    # Mean curve 0.2, 0.4: it reaches 0.30 at step 20; seeds 1 and 2 reach it (0.5, 0.4, 0.3 at
    # step 20: seed 0's 0.3 counts too), sft (0.0, 0.2) never does.
    assert REACH == 0.30
    assert c["reach"] == {"accuracy": 0.30, "step": 20, "seeds": 3}
    assert curves["sft"]["reach"] == {"accuracy": 0.30, "step": None, "seeds": 0}
