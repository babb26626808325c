"""Dataset presets (field mapping, difficulty, answer type) and the answer extractor they pick."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clpd_ray.config import config_from_dict
from clpd_ray.curriculum.difficulty import count_steps
from clpd_ray.data.example import AnswerExtractor
from clpd_ray.data.loaders import load_examples
from clpd_ray.data.presets import PRESETS
from clpd_ray.errors import ConfigError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _load(path: Path | str, preset: str, **overrides) -> list:
    """Load ``path`` the way a run with ``data.preset`` (and overrides) does."""
    d = config_from_dict({"data": {"preset": preset, **overrides}}).data
    return load_examples(
        path,
        prompt_field=d.prompt_field,
        cot_field=d.cot_field,
        answer_field=d.answer_field,
        cot_steps=d.cot_steps,
        prompt_template=d.prompt_template,
        chat=d.chat_template,
        extractor=AnswerExtractor(d.answer_type, d.last_number_fallback),
    )


# --- config: presets fill keys, explicit keys win ---------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_fills_every_key_it_names(name):
    d = config_from_dict({"data": {"preset": name}}).data
    for key, value in PRESETS[name].items():
        assert getattr(d, key) == value, key


def test_explicit_keys_override_the_preset():
    d = config_from_dict(
        {"data": {"preset": "svamp", "cot_field": "Body", "last_number_fallback": False}}
    ).data
    assert d.cot_field == "Body" and d.last_number_fallback is False
    assert d.answer_field == "Answer" and d.cot_steps == "ops"  # the rest of the preset stays
    assert d.prompt_template == "{Body} {Question}"


def test_explicit_prompt_field_replaces_the_presets_template():
    d = config_from_dict({"data": {"preset": "aqua", "prompt_field": "question"}}).data
    assert d.prompt_template is None and d.prompt_field == "question"
    d = config_from_dict(
        {"data": {"preset": "aqua", "prompt_field": "q", "prompt_template": "{q}!"}}
    ).data
    assert d.prompt_template == "{q}!"


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_a_saved_config_reloads_to_the_same_keys(name):
    """run.yaml holds every key explicitly; loading it again must not re-apply the preset differently."""
    config = config_from_dict({"data": {"preset": name}})
    assert config_from_dict(config.to_dict()) == config


def test_unknown_preset_lists_the_allowed_names():
    with pytest.raises(ConfigError, match=r"data\.preset.*'gsm8k'.*'mawps'"):
        config_from_dict({"data": {"preset": "gsm9k"}})


@pytest.mark.parametrize("template", ["{}", "{0}", "{a.b}", "no fields", "{unclosed"])
def test_bad_prompt_template_is_a_config_error(template):
    with pytest.raises(ConfigError, match=r"data\.prompt_template"):
        config_from_dict({"data": {"prompt_template": template}})


def test_a_file_of_another_dataset_names_the_preset(tmp_path):
    from clpd_ray.errors import DataError
    from clpd_ray.workload import _external

    rows = [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(10)]
    path = _write(tmp_path / "gsm.jsonl", rows, lines=True)
    cfg = config_from_dict({"data": {"path": str(path), "preset": "aqua"}})
    with pytest.raises(DataError, match=r"no field 'rationale'.*data\.preset: aqua.*override"):
        _external(cfg)


# --- presets on hand-written rows in each dataset's format -------------------------------------


def _write(path: Path, rows: list[dict], lines: bool = False) -> Path:
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows, indent=1)
    )
    return path


def test_svamp_prompt_is_body_and_question_cot_is_equation(tmp_path):
    row = {
        "ID": "x",
        "Body": "Dan had $ 3 left .",
        "Question": "How much did he spend?",
        "Equation": "( 4.0 - ( 3.0 * 1.0 ) )",
        "Answer": 1.0,
        "Type": "Subtraction",
    }
    (ex,) = _load(_write(tmp_path / "SVAMP.json", [row]), "svamp")
    assert ex.prompt == "Question: Dan had $ 3 left . How much did he spend?\nAnswer:"
    assert ex.target == " ( 4.0 - ( 3.0 * 1.0 ) )\n#### 1"
    assert (ex.answer, ex.steps) == ("1", 2)


def test_aqua_prompt_lists_options_answer_is_the_letter(tmp_path):
    row = {
        "question": "2+2?",
        "options": ["A)1", "B)2", "C)3", "D)4", "E)5"],
        "rationale": "2+2=4\nAnswer: D",
        "correct": "D",
    }
    (ex,) = _load(_write(tmp_path / "dev.json", [row], lines=True), "aqua")
    assert ex.prompt == "Question: 2+2?\nOptions: A)1 B)2 C)3 D)4 E)5\nAnswer:"
    assert ex.target == " 2+2=4\nAnswer: D\n#### D"
    assert (ex.answer, ex.steps) == ("D", 2)


def test_strategyqa_cot_is_the_decomposition_answer_a_boolean(tmp_path):
    rows = [
        {
            "qid": "a",
            "question": "Q?",
            "answer": False,
            "decomposition": ["A?", "B?", "Is #1 > #2?"],
        },
        {"qid": "b", "question": "R?", "answer": True, "decomposition": ["C?"]},
    ]
    got = _load(_write(tmp_path / "dev.json", rows), "strategyqa")
    assert [e.answer for e in got] == ["false", "true"]
    assert [e.steps for e in got] == [3, 1]
    assert got[0].target == " A?\nB?\nIs #1 > #2?\n#### false"
    # The '#1' references inside the decomposition do not hide the final answer.
    assert AnswerExtractor("boolean").extract(got[0].target) == "false"


def test_mawps_cot_is_the_equation_answer_ans(tmp_path):
    row = {"id": 1, "original_text": "A has 22 .", "equation": "X=((22.0-14.0)/4.0)", "ans": 2.0}
    (ex,) = _load(_write(tmp_path / "trainset.json", [row]), "mawps")
    assert (ex.prompt, ex.target) == (
        "Question: A has 22 .\nAnswer:",
        " X=((22.0-14.0)/4.0)\n#### 2",
    )
    assert (ex.answer, ex.steps) == ("2", 2)


def test_chat_format_prompt_is_the_bare_question(tmp_path):
    row = {"Body": "B.", "Question": "Q?", "Equation": "( 1.0 + 2.0 )", "Answer": 3.0}
    (ex,) = _load(_write(tmp_path / "s.json", [row]), "svamp", chat_template=True)
    assert (ex.prompt, ex.target) == ("B. Q?", "( 1.0 + 2.0 )\n#### 3")


@pytest.mark.parametrize(
    ("equation", "ops"),
    [
        ("( 76.0 - 25.0 )", 1),
        ("X=((22.0-14.0)/4.0)", 2),
        ("( -3.0 + 2.0 )", 1),  # a sign is not an operation
        ("8.0", 1),  # at least one step
        ("X=(1+2)*3-4/5", 4),
    ],
)
def test_ops_step_mode(equation, ops):
    assert count_steps(equation, "ops") == ops


# --- the real files (skipped without ../shared) -------------------------------------------------

REAL = {
    "gsm8k": ("gsm8k/test.jsonl", 1319),
    "svamp": ("svamp/SVAMP.json", 1000),
    "aqua": ("aqua/dev.json", 254),
    "strategyqa": ("strategyqa/dev.json", 229),
    "mawps": ("mawps/trainset.json", 1898),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_preset_loads_the_real_file(name):
    rel, rows = REAL[name]
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"{path} not present")
    examples = _load(path, name)
    assert len(examples) == rows  # no row is dropped
    ex = AnswerExtractor(PRESETS[name]["answer_type"])
    # Every gold target is read back as its own answer by the preset's extractor.
    assert all(ex.matches(e.target, e.answer) for e in examples)
    steps = [e.steps for e in examples]
    assert min(steps) >= 1
    raw = (
        [json.loads(line) for line in path.read_text().splitlines()]
        if path.suffix == ".jsonl" or name == "aqua"
        else json.loads(path.read_text())
    )
    if name == "strategyqa":
        assert steps == [len(r["decomposition"]) for r in raw]
        assert [e.answer for e in examples] == [str(r["answer"]).lower() for r in raw]
    if name == "aqua":
        assert [e.answer for e in examples] == [r["correct"] for r in raw]
        assert all(
            all(o in e.prompt for o in r["options"]) for e, r in zip(examples, raw, strict=True)
        )
    if name in ("svamp", "mawps"):
        assert max(steps) >= 2  # operator counts vary (SVAMP 1-2, MAWPS up to 10)


# --- answer extraction ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 72 clips", "72"),
        ("#### $1,234.50", "1234.5"),
        ("#### 50%", "50"),
        ("#### 72.0", "72"),
        ("#### -$5", "-5"),
        ("#### 1/4", "0.25"),
        ("so \\boxed{18}", "18"),
        ("\\boxed{\\frac{1}{2}}", "0.5"),
        ("\\boxed{72 \\text{ clips}}", "72"),
        ("#### 3\nthen \\boxed{4}", "4"),  # whichever answer comes last
        ("\\boxed{4} and #### 3", "3"),
        ("#### 3,4", "3"),  # not a thousands group
        ("it is 5 and 6", None),  # no marker, no fallback
        ("#### many", None),  # the last answer has no number: no older one is taken
    ],
)
def test_number_extraction(text, expected):
    assert AnswerExtractor("number").extract(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("she has 3 apples, then 5 more: 8 in all", "8"),
        ("costs $1,200.", "1200"),
        ("x = <<4*2=8>>8 and y = -3", "-3"),
        ("5-3", "3"),  # a hyphen after a number is an operator, not a sign
        ("#### twelve\nor 11", "11"),  # the last answer has no number: the fallback reads on
        ("no digits", None),
    ],
)
def test_last_number_fallback(text, expected):
    assert AnswerExtractor("number", last_number_fallback=True).extract(text) == expected


def test_fallback_only_when_configured():
    text = "The answer is 42"
    assert AnswerExtractor("number").extract(text) is None
    assert AnswerExtractor("number", last_number_fallback=True).extract(text) == "42"
    # An explicit answer wins over the fallback.
    assert AnswerExtractor("number", True).extract("7 then #### 9 with 11") == "9"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### C", "C"),
        ("#### (C)", "C"),
        ("#### C)", "C"),
        ("#### c.", "C"),
        ("#### C) 600", "C"),
        ("#### The answer is (B)", "B"),
        ("\\boxed{E}", "E"),
        ("#### F", None),
        ("#### Cats", None),
        ("#### a total of 5", None),  # an article, not option (a)
        ("#### b", "B"),
    ],
)
def test_choice_extraction(text, expected):
    assert AnswerExtractor("choice").extract(text) == expected


def test_choice_fallback_reads_the_last_option_mark():
    ex = AnswerExtractor("choice", last_number_fallback=True)
    assert ex.extract("A) is wrong, so the answer is (D)") == "D"
    assert AnswerExtractor("choice").extract("the answer is (D)") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### true", "true"),
        ("#### Yes", "true"),
        ("#### no.", "false"),
        ("#### FALSE", "false"),
        ("\\boxed{yes}", "true"),
        ("#### maybe", None),
        ("#### nothing", None),  # 'no' inside a word is not an answer
    ],
)
def test_boolean_extraction(text, expected):
    assert AnswerExtractor("boolean").extract(text) == expected


def test_matches_normalises_the_gold_answer_by_type():
    assert AnswerExtractor("number").matches("#### 1,200 dollars", "1200.0")
    assert AnswerExtractor("choice").matches("#### (b)", "B")
    assert AnswerExtractor("boolean").matches("#### yes", "true")
    assert not AnswerExtractor("boolean").matches("#### yes", "false")
    assert AnswerExtractor("text").matches("#### New  York.", "new york")
    assert not AnswerExtractor("number").matches("", "")
