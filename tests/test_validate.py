"""``clpd validate`` beyond the schema: data and model paths load, tokenizers agree, lengths fit.

Stand-in checkpoints are a config.json and a tokenizer (validate reads no weights), so these
tests are fast; the Qwen2.5 config's check uses the real Qwen3 tokenizer (skipped without
../shared).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from transformers import Qwen2Config

from clpd_ray.cli import main
from clpd_ray.config import Config
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
QWEN3_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen3"
ROWS = [{"question": f"{i}+{i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"} for i in range(12)]


def standin(path: Path, rows: int, *, positions: int = 512, tokenizer=None) -> str:
    """A checkpoint directory as validate sees it: config.json + tokenizer, no weights."""
    Qwen2Config(
        vocab_size=rows,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=positions,
    ).save_pretrained(path)
    if isinstance(tokenizer, Path):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer / f, path / f)
    else:
        (tokenizer or build_char_tokenizer()).save_pretrained(path)
    return str(path)


def _validate(tmp_path: Path, raw: dict, *overrides: str) -> int:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return main(["validate", str(cfg), *[x for o in overrides for x in ("--set", o)]])


@pytest.fixture
def data(tmp_path) -> str:
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return str(p)


def _external(data: str, student: str, teachers: list[str]) -> dict:
    ladder = [{"name": f"t{i}", "path": t} for i, t in enumerate(teachers)]
    return {
        "data": {"path": data, "eval_fraction": 0.25, "probe_rows": 2},
        "student": {"path": student},
        "teachers": {"ladder": ladder},
        "curriculum": {"num_stages": len(ladder)},
    }


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "clpd: error:" in err and "Traceback" not in err
    return err


def test_missing_data_path_exits_2(tmp_path, capsys):
    raw = {"task": {"train_size": 100, "eval_size": 10}, "data": {"path": str(tmp_path / "x")}}
    assert _validate(tmp_path, raw) == 2
    err = _err(capsys)
    assert str(tmp_path / "x") in err and "does not exist" in err


def test_rows_that_do_not_map_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"q": "1+1?", "a": "#### 2"}) + "\n")
    assert _validate(tmp_path, {"data": {"path": str(bad), "preset": "gsm8k"}}) == 2
    assert "available fields: q, a" in _err(capsys)


def test_missing_model_path_names_it_and_how_to_get_it(tmp_path, data, capsys):
    a = standin(tmp_path / "a", 32)
    missing = str(tmp_path / "models" / "Qwen" / "Qwen2.5-7B-Instruct")
    assert _validate(tmp_path, _external(data, a, [a, a, missing])) == 2
    err = _err(capsys)
    assert "teachers.ladder[t2].path" in err and missing in err
    assert f"huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir {missing}" in err


def test_padded_vocab_sizes_on_one_tokenizer_pass(tmp_path, data, capsys):
    """Qwen2.5: 152,064 rows (7B) and 151,936 (the small ones) over one token map."""
    small, big = standin(tmp_path / "small", 32), standin(tmp_path / "big", 64)
    assert _validate(tmp_path, _external(data, small, [small, small, big])) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "32 rows" in out and "64 rows" in out


def test_fewer_rows_than_tokens_exit_2(tmp_path, data, capsys):
    ok, short = standin(tmp_path / "ok", 32), standin(tmp_path / "short", 10)
    assert _validate(tmp_path, _external(data, ok, [ok, ok, short])) == 2
    err = _err(capsys)
    assert "teachers.ladder[t2].path" in err and "10 embedding rows" in err
    assert f"{len(build_char_tokenizer())} tokens" in err


def test_different_tokenizers_for_token_kd_exit_2(tmp_path, data, capsys):
    ok = standin(tmp_path / "ok", 32)
    other = standin(tmp_path / "other", 32, tokenizer=build_char_tokenizer("abc#0123456789"))
    assert _validate(tmp_path, _external(data, ok, [ok, ok, other])) == 2
    assert "differ" in _err(capsys)


def test_too_long_for_a_model_exits_2_naming_it_and_the_fix(tmp_path, data, capsys):
    ok = standin(tmp_path / "ok", 32)
    short = standin(tmp_path / "short", 32, positions=20)
    raw = _external(data, ok, [ok, short, ok])
    assert _validate(tmp_path, raw) == 2
    err = _err(capsys)
    assert "teachers.ladder[t1].path" in err and "at most 20 positions" in err
    assert "train.max_length: 20" in err
    assert _validate(tmp_path, raw, "train.max_length=20") == 0


def test_built_student_too_short_for_the_embedded_task(tmp_path, capsys):
    raw = {"task": {"train_size": 100, "eval_size": 10}, "student": {"max_positions": 16}}
    assert _validate(tmp_path, raw) == 2
    err = _err(capsys)
    assert "student" in err and "at most 16 positions" in err and "longest training" in err
    assert "student.max_positions" in err and "train.max_length: 16" in err
    assert _validate(tmp_path, raw, "train.max_length=16") == 0


def test_run_checks_lengths_before_actors_start(tmp_path):
    """The run's check (after the workload, before any actor): the same message, exit 2."""
    from clpd_ray.runtime.run import check_models

    config = Config.model_validate({"student": {"max_positions": 16}})
    train = generate_examples(50, 6, seed=0)
    tok = build_char_tokenizer()
    workload = SimpleNamespace(tokenizer=tok, train=train, probe_pool=[], length_stats={})
    with pytest.raises(ConfigError, match=r"student reads at most 16 positions"):
        check_models(config, workload)  # type: ignore[arg-type]
    fits = config.model_copy(update={"train": config.train.model_copy(update={"max_length": 16})})
    check_models(fits, workload)  # type: ignore[arg-type]


def test_qwen25_config_without_weights_names_every_model(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no models/ here
    assert main(["validate", str(ROOT / "configs" / "gsm8k_qwen2.5.yaml")]) == 2
    err = _err(capsys)
    assert "4 models are missing" in err
    for size in ("0.5B", "1.5B", "3B", "7B"):
        repo = f"Qwen/Qwen2.5-{size}-Instruct"
        assert f"huggingface-cli download {repo} --local-dir models/{repo}" in err


@pytest.mark.skipif(not QWEN3_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/qwen3")
def test_qwen25_config_passes_with_the_models_present(tmp_path, capsys):
    paths = {}
    for size in ("0.5B", "1.5B", "3B", "7B"):
        rows = 152_064 if size == "7B" else 151_936
        paths[size] = standin(tmp_path / size, rows, positions=32_768, tokenizer=QWEN3_TOKENIZER)
    overrides = [
        f"student.path={paths['0.5B']}",
        "teachers.ladder="
        + json.dumps(
            [
                {"name": "qwen2.5-1.5b", "path": paths["1.5B"]},
                {"name": "qwen2.5-3b", "path": paths["3B"]},
                {"name": "qwen2.5-7b", "path": paths["7B"]},
            ]
        ),
    ]
    argv = ["validate", str(ROOT / "configs" / "gsm8k_qwen2.5.yaml")]
    assert main(argv + [x for o in overrides for x in ("--set", o)]) == 0
    out = capsys.readouterr().out
    assert "152,064 rows" in out and "151,936 rows" in out and "valid" in out
