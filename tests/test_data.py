"""Loading datasets into Examples: file formats, field mapping, error messages, real GSM8K."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from clpd_ray.curriculum.difficulty import count_steps
from clpd_ray.data.example import Example, normalise_answer
from clpd_ray.data.loaders import format_prompt, load_examples, train_eval_split
from clpd_ray.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GSM8K_TEST = SHARED_DATA / "gsm8k" / "test.jsonl"

ROWS = [
    {"q": "What is 2+3?", "cot": "2+3 = <<2+3=5>>5\n#### 5", "ans": "5"},
    {"q": "  What is 4*2?  ", "cot": "4*2 = <<4*2=8>>8\nSo 8.\n#### 8", "ans": "8"},
]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _load(path: Path, **kw) -> list[Example]:
    kw.setdefault("prompt_field", "q")
    kw.setdefault("cot_field", "cot")
    return load_examples(path, **kw)


# --- formats ------------------------------------------------------------------------------------


def test_jsonl_maps_fields_and_reads_answer_from_cot(tmp_path):
    got = _load(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert got == [
        # The target keeps the space after "Answer:" (the split falls on a token boundary).
        Example("Question: What is 2+3?\nAnswer:", " " + ROWS[0]["cot"], "5", 1),
        Example("Question: What is 4*2?\nAnswer:", " " + ROWS[1]["cot"], "8", 2),
    ]


def test_json_array_with_json_extension(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps(ROWS, indent=2))
    assert [e.answer for e in _load(path)] == ["5", "8"]


def test_json_lines_with_json_extension(tmp_path):
    # AQuA's .json files are JSON Lines.
    assert len(_load(_write_jsonl(tmp_path / "d.json", ROWS))) == 2


def test_parquet(tmp_path):
    path = tmp_path / "d.parquet"
    Dataset.from_list(ROWS).to_parquet(str(path))
    assert _load(path) == _load(_write_jsonl(tmp_path / "d.jsonl", ROWS))


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert len(_load(tmp_path / "ds")) == 2
    DatasetDict(
        {"train": Dataset.from_list(ROWS), "test": Dataset.from_list(ROWS[:1])}
    ).save_to_disk(str(tmp_path / "dd"))
    assert len(_load(tmp_path / "dd")) == 2
    assert len(_load(tmp_path / "dd", split="test")) == 1
    with pytest.raises(DataError, match=r"no split 'dev'; available splits: train, test"):
        _load(tmp_path / "dd", split="dev")


# --- field mapping --------------------------------------------------------------------------------


def test_answer_field_appends_answer_line(tmp_path):
    rows = [{"q": "Q1", "cot": "step a\nstep b", "ans": " 1,200 "}]
    (ex,) = _load(_write_jsonl(tmp_path / "d.jsonl", rows), answer_field="ans")
    assert ex.prompt == format_prompt("Q1") == "Question: Q1\nAnswer:"
    assert ex.target == " step a\nstep b\n#### 1,200"
    assert ex.answer == "1200"
    assert ex.steps == 2


def test_answer_field_numbers_and_booleans(tmp_path):
    rows = [
        {"q": "a", "cot": "x", "ans": 8.0, "flag": True},
        {"q": "b", "cot": "y", "ans": 2.5, "flag": False},
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert [e.target for e in _load(path, answer_field="ans")] == [" x\n#### 8", " y\n#### 2.5"]
    assert [e.answer for e in _load(path, answer_field="flag")] == ["true", "false"]


def test_list_cot_is_one_step_per_line(tmp_path):
    rows = [{"q": "a", "parts": ["first?", "second?", "third?"], "ans": True}]
    (ex,) = _load(_write_jsonl(tmp_path / "d.jsonl", rows), cot_field="parts", answer_field="ans")
    assert ex.target == " first?\nsecond?\nthird?\n#### true"
    assert ex.steps == 3


def test_calc_step_mode(tmp_path):
    rows = [{"q": "a", "cot": "<<1+1=2>> and <<2*3=6>>\nno calc here\n#### 6"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    assert _load(path, cot_steps="calc")[0].steps == 2
    assert _load(path, cot_steps="lines")[0].steps == 2


def test_rows_without_final_answer_line_are_dropped(tmp_path, caplog):
    rows = [
        *ROWS,
        {"q": "c", "cot": "item #3 is cheap\nno answer line"},
        {"q": "  ", "cot": "#### 1"},
    ]
    got = _load(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert [e.answer for e in got] == ["5", "8"]
    assert "dropped 2 of 4 rows" in caplog.text


def test_train_eval_split_deterministic_and_disjoint():
    examples = [Example(f"p{i}", f"t{i}", str(i), 1) for i in range(50)]
    train, held = train_eval_split(examples, 0.2, seed=3)
    assert (len(train), len(held)) == (40, 10)
    assert sorted([*train, *held], key=lambda e: int(e.answer)) == examples
    assert train == [e for e in examples if e in train]  # input order kept
    assert train_eval_split(examples, 0.2, seed=3) == (train, held)
    assert train_eval_split(examples, 0.2, seed=4) != (train, held)
    assert [len(x) for x in train_eval_split(examples[:2], 0.01, seed=0)] == [1, 1]
    with pytest.raises(DataError, match="at least 2"):
        train_eval_split(examples[:1], 0.5, seed=0)
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(examples, 1.0, seed=0)


# --- errors -----------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist.*data\.path"):
        _load(tmp_path / "nope.jsonl")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("q,cot\n")
    with pytest.raises(
        DataError, match=r"d\.csv: unsupported file type '\.csv'; use \.json, \.jsonl"
    ):
        _load(path)


def test_directory_that_is_not_a_saved_dataset(tmp_path):
    with pytest.raises(DataError, match=r"not a dataset saved with Dataset\.save_to_disk"):
        _load(tmp_path)


def test_missing_field_lists_available_fields(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(
        DataError,
        match=r"d\.jsonl: row 0 .*no field 'question' \(set by prompt_field\); available fields: q, cot, ans",
    ):
        _load(path, prompt_field="question")
    with pytest.raises(DataError, match=r"no field 'answer' \(set by answer_field\)"):
        _load(path, answer_field="answer")


def test_null_or_absent_value_names_first_bad_row(tmp_path):
    rows = [*ROWS, {"q": "c", "cot": "#### 1"}, {"q": "d", "cot": None, "ans": "2"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"d\.jsonl: row 3 .*field 'cot' \(set by cot_field\); available fields: q, cot, ans",
    ):
        _load(path)
    with pytest.raises(DataError, match=r"row 2 .*no value \(missing or null\) for field 'ans'"):
        _load(path, answer_field="ans")


def test_non_string_value(tmp_path):
    rows = [*ROWS, {"q": 7, "cot": "#### 1"}]
    with pytest.raises(
        DataError,
        match=r"row 2 \(0-based\), field 'q' \(set by prompt_field\) holds a int \(7\), not text",
    ):
        _load(_write_jsonl(tmp_path / "d.jsonl", rows))
    rows = [{"q": "a", "cot": "x", "ans": {"v": 1}}]
    with pytest.raises(DataError, match=r"row 0 .*field 'ans' .*holds a dict"):
        _load(_write_jsonl(tmp_path / "e.jsonl", rows), answer_field="ans")


@pytest.mark.parametrize("content", ["", "  \n", "[]"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_text(content)
    with pytest.raises(DataError, match=r"d\.json: the (file|dataset) is empty"):
        _load(path)


def test_empty_parquet_and_saved_dataset(tmp_path):
    empty = Dataset.from_dict({"q": [], "cot": []})
    empty.to_parquet(str(tmp_path / "d.parquet"))
    empty.save_to_disk(str(tmp_path / "ds"))
    for path in (tmp_path / "d.parquet", tmp_path / "ds"):
        with pytest.raises(DataError, match="is empty"):
            _load(path)


def test_malformed_json(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "a", "cot": "#### 1"}\n{"q": \n')
    with pytest.raises(DataError, match=r"d\.jsonl: cannot be read as json"):
        _load(path)


def test_all_rows_filtered(tmp_path):
    rows = [{"q": "a", "cot": "no answer"}, {"q": "b", "cot": "still none"}]
    with pytest.raises(
        DataError, match=r"all 2 rows were dropped \(2 with no final answer\); .*set answer_field"
    ):
        _load(_write_jsonl(tmp_path / "d.jsonl", rows))


def test_bad_cot_steps_mode(tmp_path):
    with pytest.raises(DataError, match="cot_steps='words'"):
        _load(_write_jsonl(tmp_path / "d.jsonl", ROWS), cot_steps="words")


# --- real GSM8K -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K not present at {GSM8K_TEST}")
    return [json.loads(line) for line in GSM8K_TEST.read_text().splitlines()]


def test_gsm8k_lines(gsm8k_rows):
    examples = load_examples(GSM8K_TEST, prompt_field="question", cot_field="answer")
    assert len(examples) == len(gsm8k_rows) == 1319
    steps = [e.steps for e in examples]
    # The data README: 2-11 lines, mean 3.6, not counting the '####' line.
    assert min(steps) >= 1 and max(steps) <= 11
    assert 3.3 < sum(steps) / len(steps) < 3.9
    for e, row in zip(examples, gsm8k_rows, strict=True):
        assert e.target == " " + row["answer"].strip()
        assert e.prompt == f"Question: {row['question'].strip()}\nAnswer:"
        assert re.fullmatch(r"-?\d+(\.\d+)?", e.answer), e.answer
        assert e.answer == normalise_answer(row["answer"].rsplit("####", 1)[1])


def test_gsm8k_calc(gsm8k_rows):
    examples = load_examples(
        GSM8K_TEST, prompt_field="question", cot_field="answer", cot_steps="calc"
    )
    steps = [e.steps for e in examples]
    assert steps == [max(1, row["answer"].count("<<")) for row in gsm8k_rows]
    assert min(steps) >= 1 and max(steps) <= 12
    assert steps == [count_steps(row["answer"], "calc") for row in gsm8k_rows]


# --- packaged samples -----------------------------------------------------------------------------


def test_gsm8k_sample_ships_with_its_licence():
    from clpd_ray.data.loaders import available_samples, resolve_data_path

    assert {"sample:gsm8k/train.jsonl", "sample:gsm8k/test.jsonl"} <= set(available_samples())
    train = resolve_data_path("sample:gsm8k/train.jsonl")
    assert "Copyright (c) 2021 OpenAI" in (train.parent / "LICENSE").read_text()
    assert "openai/grade-school-math" in (train.parent / "README.md").read_text()
    got = load_examples("sample:gsm8k/train.jsonl", prompt_field="question", cot_field="answer")
    assert len(got) == 1000
    assert (
        len(load_examples("sample:gsm8k/test.jsonl", prompt_field="question", cot_field="answer"))
        == 300
    )


def test_gsm8k_sample_is_a_byte_copy_of_the_source():
    from clpd_ray.data.loaders import resolve_data_path

    for name, rows in (("train", 1000), ("test", 300)):
        source = SHARED_DATA / "gsm8k" / f"{name}.jsonl"
        if not source.is_file():
            pytest.skip(f"{source} not present")
        head = b"".join(source.read_bytes().splitlines(keepends=True)[:rows])
        assert resolve_data_path(f"sample:gsm8k/{name}.jsonl").read_bytes() == head


def test_samples_are_package_data():
    from fnmatch import fnmatch

    from clpd_ray.data.loaders import resolve_data_path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["clpd_ray"]
    sample_dir = resolve_data_path("sample:gsm8k/train.jsonl").parent
    for f in sample_dir.iterdir():
        rel = f.relative_to(root / "clpd_ray").as_posix()
        assert any(fnmatch(rel, p) for p in patterns), rel


@pytest.mark.parametrize("path", ["sample:gsm8k/dev.jsonl", "sample:", "sample:../config.py"])
def test_unknown_sample_lists_the_available_ones(path):
    from clpd_ray.errors import ClpdError

    with pytest.raises(
        DataError, match=r"no such packaged sample; available: .*sample:gsm8k/test\.jsonl"
    ) as err:
        load_examples(path, prompt_field="question", cot_field="answer")
    assert isinstance(err.value, ClpdError)  # the CLI's exit 2


# --- prompt templates -----------------------------------------------------------------------------


def test_prompt_template_joins_fields_and_lists(tmp_path):
    rows = [{"a": "Body.", "b": "Q?", "opts": ["A)1", "B)2"], "n": 3, "cot": "c\n#### 1"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    (ex,) = load_examples(
        path, prompt_field="unused", cot_field="cot", prompt_template="{a} {b} [{opts}] {n}"
    )
    assert ex.prompt == "Question: Body. Q? [A)1 B)2] 3\nAnswer:"


def test_prompt_template_with_a_missing_field_names_it(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(
        DataError, match=r"no field 'Body' \(set by prompt_template.*available fields: q, cot, ans"
    ):
        load_examples(path, prompt_field="q", cot_field="cot", prompt_template="{Body} {q}")


# --- the run's split: eval only from eval_path, probes from training rows, deduplicated -----------


def _rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"q": f"{prefix}{i}", "cot": f"step\n#### {i}"} for i in range(n)]


def _split(tmp_path, train_rows, eval_rows=None, **data):
    from clpd_ray.config import config_from_dict
    from clpd_ray.workload import _external

    section = {
        "path": str(_write_jsonl(tmp_path / "train.jsonl", train_rows)),
        "prompt_field": "q",
        "cot_field": "cot",
        **data,
    }
    if eval_rows is not None:
        section["eval_path"] = str(_write_jsonl(tmp_path / "eval.jsonl", eval_rows))
    return _external(config_from_dict({"data": section}))


def test_eval_path_is_evaluation_only_and_probes_come_from_training_rows(tmp_path):
    train, held_out, probe, stats = _split(tmp_path, _rows(100), _rows(30, "e"), probe_rows=20)
    assert [e.prompt for e in held_out] == [format_prompt(f"e{i}") for i in range(30)]  # all of it
    train_q = {e.prompt for e in train}
    probe_q = {e.prompt for e in probe}
    assert len(probe) == 20 and len(train) == 80 and not train_q & probe_q
    assert train_q | probe_q == {format_prompt(f"q{i}") for i in range(100)}
    assert stats == {
        "duplicates_dropped": 0,
        "probe_duplicates_dropped": 0,
        "train_rows": 80,
        "eval_rows": 30,
        "probe_rows": 20,
    }


def test_without_eval_path_eval_and_probe_are_disjoint_held_out_rows(tmp_path):
    train, held_out, probe, _ = _split(tmp_path, _rows(200), eval_fraction=0.1, probe_rows=30)
    sets = [{e.prompt for e in s} for s in (train, held_out, probe)]
    assert [len(s) for s in sets] == [150, 20, 30]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])


def test_training_rows_asking_an_eval_question_are_dropped_and_counted(tmp_path):
    rows = _rows(50)
    rows += [
        {"q": "  e3 ", "cot": "other\n#### 9"},
        {"q": "E7", "cot": "x\n#### 7"},
    ]  # same questions
    train, held_out, _, stats = _split(tmp_path, rows, _rows(10, "e"), probe_rows=5)
    assert stats["duplicates_dropped"] == 2 and stats["train_rows"] == len(train) == 45
    eval_q = {e.prompt for e in held_out}
    assert not eval_q & {e.prompt for e in train}


def test_max_rows_keep_the_first_rows(tmp_path):
    train, held_out, probe, _ = _split(
        tmp_path, _rows(100), _rows(30, "e"), probe_rows=10, max_train_rows=25, max_eval_rows=7
    )
    assert len(train) == 25 and len(held_out) == 7 and len(probe) == 10
    assert held_out[-1].prompt == format_prompt("e6")
    order = [int(e.prompt.split("q")[1].split("\n")[0]) for e in train]
    assert order == sorted(order)  # the first rows that are not held out, in file order


def test_probe_rows_are_capped_at_half_the_training_side(tmp_path, caplog):
    train, _, probe, _ = _split(tmp_path, _rows(10), _rows(3, "e"), probe_rows=200)
    assert (len(train), len(probe)) == (5, 5)
    assert "holding out 5 for probes" in caplog.text


# --- train.max_length at workload build -------------------------------------------------------------


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_workload_fits_train_and_probe_rows_and_counts(overlong):
    from clpd_ray.config import config_from_dict
    from clpd_ray.data.batching import tokenize_rows
    from clpd_ray.data.prompt_format import PromptFormat
    from clpd_ray.data.task import generate_examples
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.workload import _fit_lengths

    tok, fmt = build_char_tokenizer(), PromptFormat()
    train = generate_examples(60, 6, seed=0)
    probe = generate_examples(20, 6, seed=0, split="probe")
    held_out = generate_examples(30, 6, seed=0, split="eval")
    lengths = {
        name: [len(ids) for ids, _ in tokenize_rows(tok, rows)]
        for name, rows in (("train", train), ("probe", probe), ("eval", held_out))
    }
    cfg = config_from_dict({"train": {"max_length": 20, "overlong": overlong}})
    fitted_train, fitted_probe, stats = _fit_lengths(cfg, tok, fmt, train, probe, held_out)
    over = {name: sum(n > 20 for n in v) for name, v in lengths.items()}
    assert over["train"] > 0 and over["probe"] > 0  # the test means something
    assert all(len(ids) <= 20 for ids, _ in tokenize_rows(tok, fitted_train + fitted_probe))
    if overlong == "truncate":  # every prompt here is at most 2 * 6 + 2 = 14 tokens: all fit
        assert (len(fitted_train), len(fitted_probe)) == (60, 20)
        assert stats["truncated"] == over["train"] + over["probe"] and stats["dropped"] == 0
    else:
        assert (len(fitted_train), len(fitted_probe)) == (60 - over["train"], 20 - over["probe"])
        assert stats["dropped"] == over["train"] + over["probe"] and stats["truncated"] == 0
    assert stats["max_length"] == 20 and stats["overlong"] == overlong
    assert stats["longest"] == max(lengths["train"] + lengths["probe"])
    assert stats["by_split"]["eval"] == {
        "longer_than_max_length": over["eval"],
        "longest": max(lengths["eval"]),
    }
    unlimited = _fit_lengths(config_from_dict({}), tok, fmt, train, probe, held_out)
    assert unlimited[0] == train and unlimited[2]["truncated"] == unlimited[2]["dropped"] == 0


def test_workload_all_rows_too_long_to_keep_is_a_data_error():
    from clpd_ray.config import config_from_dict
    from clpd_ray.data.prompt_format import PromptFormat
    from clpd_ray.data.task import generate_examples
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.workload import _fit_lengths

    rows = generate_examples(10, 6, seed=0)
    cfg = config_from_dict({"train": {"max_length": 8, "overlong": "drop"}})
    with pytest.raises(DataError, match=r"train\.max_length=8"):
        _fit_lengths(cfg, build_char_tokenizer(), PromptFormat(), rows, rows, rows)
