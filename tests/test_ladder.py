"""The teacher ladder: train tiny teachers once, cache them by key, reload, and report accuracy."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch

import clpd_ray.distill.ladder as ladder_mod
from clpd_ray.config import Config, TeacherSpec
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer, load_tokenizer
from clpd_ray.distill.chunked import output_head
from clpd_ray.distill.ladder import LadderEntry, accuracy_table, ensure_ladder, teacher_cache_key
from clpd_ray.distill.models import build_model, count_parameters, load_causal_lm
from clpd_ray.distill.training import to_torch
from clpd_ray.errors import ConfigError

MAX_DIFFICULTY = 3
TEACHERS = [
    {"name": "t-a", "n_layer": 1, "n_embd": 16, "n_head": 2, "train_steps": 5},
    {"name": "t-b", "n_layer": 2, "n_embd": 16, "n_head": 2, "train_steps": 5},
]


def _config(cache_dir: Path, teachers: list[dict] = TEACHERS, **task) -> Config:
    return Config.model_validate(
        {
            "task": {"max_difficulty": MAX_DIFFICULTY, "train_size": 200, "eval_size": 30, **task},
            "teachers": {"cache_dir": str(cache_dir), "batch_size": 8, "ladder": teachers},
        }
    )


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def data():
    return (
        generate_examples(200, MAX_DIFFICULTY, seed=0, split="train"),
        generate_examples(30, MAX_DIFFICULTY, seed=0, split="eval"),
    )


def _ensure(cfg: Config, tok, data) -> list[LadderEntry]:
    return ensure_ladder(cfg, tok, *data, progress=False, workers=1)  # here: monkeypatchable


def _count_training(monkeypatch) -> list[str]:
    trained: list[str] = []
    real = ladder_mod.train_teacher

    def counting(spec, *args, **kwargs):
        trained.append(spec.name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(ladder_mod, "train_teacher", counting)
    return trained


def _forbid_training(monkeypatch) -> None:
    def boom(spec, *args, **kwargs):
        raise AssertionError(f"teacher {spec.name} was retrained instead of loaded from cache")

    monkeypatch.setattr(ladder_mod, "train_teacher", boom)


def test_two_writers_of_one_entry_take_turns_and_the_second_trains_nothing(
    tmp_path, tok, data, monkeypatch
):
    """Two processes training the same teacher into one cache (two runs on a node): the second
    waits on the entry's lock while the first trains, then takes its entry and trains nothing."""
    import threading
    import time

    cfg = _config(tmp_path)
    spec = cfg.teachers.ladder[0]
    out = tmp_path / "teachers" / f"{spec.name}-{teacher_cache_key(cfg, spec)}"
    builds: list[str] = []
    gate = threading.Event()
    real = ladder_mod.build_model

    def build(spec, *args, **kwargs):  # the first writer holds the lock until the gate opens
        builds.append(spec.name)
        if len(builds) == 1:
            gate.wait(timeout=60)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(ladder_mod, "build_model", build)
    results: dict[str, LadderEntry] = {}

    def writer(name: str) -> threading.Thread:
        kwargs = {"batch_size": 8, "seed": 0, "out_dir": out, "progress": False}
        t = threading.Thread(
            target=lambda: results.update(
                {name: ladder_mod.train_teacher(spec, tok, *data, **kwargs)}
            )
        )
        t.start()
        return t

    first = writer("first")
    deadline = time.monotonic() + 60
    while not builds:  # the first writer is training, inside the lock
        assert time.monotonic() < deadline
        time.sleep(0.01)
    second = writer("second")
    second.join(timeout=1.0)
    assert second.is_alive() and builds == ["t-a"]  # waiting on the lock, nothing built
    gate.set()
    first.join(timeout=120)
    second.join(timeout=120)
    assert builds == ["t-a"]  # the second found the first's entry complete
    assert results["second"] == results["first"] and (out / "model.safetensors").is_file()


def test_trains_writes_and_reloads_from_cache(tmp_path, tok, data, monkeypatch):
    cfg = _config(tmp_path)
    trained = _count_training(monkeypatch)
    entries = _ensure(cfg, tok, data)
    assert trained == ["t-a", "t-b"]
    assert [e.name for e in entries] == ["t-a", "t-b"]
    for e, spec in zip(entries, cfg.teachers.ladder, strict=True):
        assert e.path == tmp_path / "teachers" / f"{spec.name}-{teacher_cache_key(cfg, spec)}"
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (e.path / f).is_file(), f
        assert not e.path.with_name(e.path.name + ".tmp").exists()
        acc = json.loads((e.path / "accuracy.json").read_text())
        assert 0.0 <= acc["accuracy"] <= 1.0
        assert acc["n"] == 30
        assert sorted(int(k) for k in acc["by_difficulty"]) == list(range(1, MAX_DIFFICULTY + 1))
        assert acc["name"] == spec.name and acc["train_steps"] == 5
        model = load_causal_lm(e.path)
        assert acc["parameters"] == e.parameters == count_parameters(model)
        assert load_tokenizer(e.path).get_vocab() == tok.get_vocab()
    assert entries[0].parameters < entries[1].parameters

    _forbid_training(monkeypatch)
    again = _ensure(cfg, tok, data)
    assert [(e.name, e.path, e.parameters) for e in again] == [
        (e.name, e.path, e.parameters) for e in entries
    ]
    for e, first in zip(again, entries, strict=True):
        assert e.accuracy["accuracy"] == first.accuracy["accuracy"]
        assert json.loads(json.dumps(e.accuracy)) == json.loads(json.dumps(first.accuracy))


def test_cached_entries_equal_fresh_entries(tmp_path, tok, data):
    cfg = _config(tmp_path, teachers=TEACHERS[:1])
    assert _ensure(cfg, tok, data) == _ensure(cfg, tok, data)


def test_changing_one_spec_retrains_only_that_teacher(tmp_path, tok, data, monkeypatch):
    first = _ensure(_config(tmp_path), tok, data)
    changed = [TEACHERS[0], {**TEACHERS[1], "train_steps": 6}]
    trained = _count_training(monkeypatch)
    second = _ensure(_config(tmp_path, teachers=changed), tok, data)
    assert trained == ["t-b"]
    assert second[0].path == first[0].path
    assert second[1].path != first[1].path
    assert second[1].accuracy["train_steps"] == 6
    assert first[1].path.is_dir()  # the old version stays cached


def test_max_train_steps_caps_built_teachers_in_their_own_cache_entries(tmp_path, tok, data):
    def cap(steps: int) -> Config:  # what `--quick` sets (teachers.max_train_steps)
        raw = _config(tmp_path).to_dict()
        return Config.model_validate(
            {**raw, "teachers": {**raw["teachers"], "max_train_steps": steps}}
        )

    full = _ensure(_config(tmp_path), tok, data)
    smoke = _ensure(cap(3), tok, data)
    assert [e.accuracy["train_steps"] for e in smoke] == [3, 3]
    assert all(s.path != f.path and f.path.is_dir() for s, f in zip(smoke, full, strict=True))
    # A cap above a teacher's own steps changes nothing: the full entries are loaded.
    assert [e.path for e in _ensure(cap(50), tok, data)] == [e.path for e in full]


def test_incomplete_cache_entry_is_retrained(tmp_path, tok, data, monkeypatch):
    first = _ensure(_config(tmp_path), tok, data)
    (first[1].path / "accuracy.json").unlink()
    trained = _count_training(monkeypatch)
    _ensure(_config(tmp_path), tok, data)
    assert trained == ["t-b"]
    assert (first[1].path / "accuracy.json").is_file()


def test_cache_key_changes_with_settings(tmp_path):
    base = _config(tmp_path)
    spec = base.teachers.ladder[0]
    key = teacher_cache_key(base, spec)
    assert len(key) == 12 and int(key, 16) >= 0
    assert teacher_cache_key(_config(tmp_path), spec) == key  # deterministic
    for task in ({"max_difficulty": 4}, {"train_size": 201}, {"eval_size": 31}):
        assert teacher_cache_key(_config(tmp_path, **task), spec) != key, task
    other_seed = base.model_copy(update={"seed": 1})
    assert teacher_cache_key(other_seed, spec) != key
    bigger_batch = base.model_copy(
        update={"teachers": base.teachers.model_copy(update={"batch_size": 16})}
    )
    assert teacher_cache_key(bigger_batch, spec) != key
    for change in ({"lr": 1e-3}, {"train_steps": 6}, {"n_embd": 32}, {"arch": "llama"}):
        assert teacher_cache_key(base, spec.model_copy(update=change)) != key, change
    # Not part of training: the name (it is in the directory name instead) and top_k.
    assert teacher_cache_key(base, spec.model_copy(update={"name": "renamed"})) == key
    topk = base.model_copy(update={"teachers": base.teachers.model_copy(update={"top_k": 3})})
    assert teacher_cache_key(topk, spec) == key


def test_missing_teacher_path_raises_config_error(tmp_path, tok, data):
    missing = tmp_path / "no-such-teacher"
    cfg = _config(tmp_path, teachers=[{"name": "ext", "path": str(missing)}])
    with pytest.raises(ConfigError) as info:
        _ensure(cfg, tok, data)
    assert str(missing) in str(info.value)
    assert "ext" in str(info.value)


def test_existing_teacher_path_is_used_as_is(tmp_path, tok, data, monkeypatch):
    trained = _ensure(_config(tmp_path / "cache", teachers=TEACHERS[:1]), tok, data)[0]
    _forbid_training(monkeypatch)
    cfg = _config(
        tmp_path / "cache2", teachers=[{"name": "ext", "path": str(trained.path)}, TEACHERS[0]]
    )
    with pytest.raises(AssertionError, match="t-a was retrained"):
        _ensure(cfg, tok, data)  # t-a is not in cache2: it would be trained
    cfg = _config(tmp_path / "cache", teachers=[{"name": "ext", "path": str(trained.path)}])
    (entry,) = _ensure(cfg, tok, data)
    assert entry.name == "ext" and entry.path == trained.path
    assert entry.accuracy["accuracy"] == trained.accuracy["accuracy"]


def test_external_data_trains_built_teachers_keyed_by_the_data(tmp_path, tok, data, monkeypatch):
    cfg = Config.model_validate(
        {**_config(tmp_path).to_dict(), "data": {"path": str(tmp_path / "d.jsonl")}}
    )
    train, held_out = data
    trained = _count_training(monkeypatch)
    entries = _ensure(cfg, tok, data)
    assert trained == ["t-a", "t-b"]
    assert all((e.path / "model.safetensors").is_file() for e in entries)
    spec = cfg.teachers.ladder[0]
    key = teacher_cache_key(cfg, spec, (train, held_out, tok))
    assert entries[0].path.name == f"t-a-{key}"
    # The key covers the examples, the held-out set, the tokenizer and the training length.
    assert teacher_cache_key(cfg, spec, (train[1:], held_out, tok)) != key
    assert teacher_cache_key(cfg, spec, (train, held_out[1:], tok)) != key
    other_tok = build_char_tokenizer("0123456789+-*=?;#")
    assert teacher_cache_key(cfg, spec, (train, held_out, other_tok)) != key
    shorter = cfg.model_copy(update={"train": cfg.train.model_copy(update={"max_length": 40})})
    assert teacher_cache_key(shorter, spec, (train, held_out, tok)) != key
    with pytest.raises(ValueError, match="external data"):
        teacher_cache_key(cfg, spec)
    _forbid_training(monkeypatch)
    assert _ensure(cfg, tok, data) == entries  # cached


def test_embedded_cache_keys_ignore_unset_new_keys(tmp_path):
    """Keys added to ModelSpec later (tokenizer, vocab_size) enter the key only when set, so
    caches made before them stay valid."""
    cfg = _config(tmp_path)
    spec = cfg.teachers.ladder[0]
    assert teacher_cache_key(cfg, spec) == teacher_cache_key(
        cfg, spec.model_copy(update={"tokenizer": None, "vocab_size": None})
    )
    assert teacher_cache_key(cfg, spec.model_copy(update={"vocab_size": 64})) != (
        teacher_cache_key(cfg, spec)
    )


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_chunked_lm_loss_equals_the_dense_loss(tok, data, monkeypatch, chunk):
    """The chunked loss (loss positions only, the head a chunk at a time, padded rows sliced
    off) against F.cross_entropy on the full logits: same value, same gradients."""
    spec = TeacherSpec(name="x", arch="qwen3", n_layer=1, n_embd=16, n_head=2, vocab_size=40)
    model = build_model(spec, tok, seed=3)
    batch = to_torch(encode_examples(tok, data[0][:5]))
    vocab = len(tok)

    def reference() -> torch.Tensor:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = torch.roll(batch["input_ids"], -1, 1)
        m = batch["loss_mask"]
        return torch.nn.functional.cross_entropy(logits[m][:, :vocab].float(), labels[m])

    want = reference()
    want.backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    monkeypatch.setattr(ladder_mod, "_DENSE_LOGITS", 0)  # force the chunked path
    monkeypatch.setattr(ladder_mod, "LOSS_CHUNK", chunk)
    got = ladder_mod._lm_loss(model, batch, vocab, split=output_head(model))
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip([p.grad for p in model.parameters()], want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)
    total = ladder_mod._lm_loss(model, batch, vocab, split=output_head(model), reduction="sum")
    torch.testing.assert_close(total / int(batch["loss_mask"].sum()), want, rtol=1e-5, atol=1e-6)


def test_teacher_given_by_path_is_scored_once(tmp_path, tok, data, monkeypatch):
    trained = _ensure(_config(tmp_path / "cache", teachers=TEACHERS[:1]), tok, data)[0]
    ext = tmp_path / "ext"
    load_causal_lm(trained.path).save_pretrained(ext)
    tok.save_pretrained(ext)  # a user's checkpoint: no accuracy.json
    cfg = _config(tmp_path / "cache2", teachers=[{"name": "ext", "path": str(ext)}])
    (entry,) = _ensure(cfg, tok, data)
    assert entry.parameters == trained.parameters == count_parameters(load_causal_lm(ext))
    # The same weights on the same held-out set: the same score as when it was trained.
    assert entry.accuracy["accuracy"] == trained.accuracy["accuracy"]
    assert entry.accuracy["by_difficulty"] == trained.accuracy["by_difficulty"]
    assert list((tmp_path / "cache2" / "teachers" / "scores").glob("ext-*.json"))
    assert not (ext / "accuracy.json").exists()  # the user's directory is left alone

    def boom(*args, **kwargs):
        raise AssertionError("a scored teacher was loaded again")

    monkeypatch.setattr(ladder_mod, "load_causal_lm", boom)
    assert _ensure(cfg, tok, data) == [entry]
    unscored = ensure_ladder(cfg, tok, data[0], data[1][1:], progress=False, score_paths=False)
    assert unscored[0].accuracy is None  # a new held-out set, scoring off: nothing to show


def test_accuracy_table_renders_rows():
    entries = [
        LadderEntry("t-a", Path("a"), {"accuracy": 0.5, "by_difficulty": {1: 1.0, 2: 0.25}}, 1234),
        LadderEntry(
            "t-b", Path("b"), {"accuracy": 0.75, "by_difficulty": {"1": 1.0, "3": 0.5}}, 56789
        ),
        LadderEntry("ext", Path("c"), None),
    ]
    lines = accuracy_table(entries).splitlines()
    assert lines[0] == "| teacher | params | all | k=1 | k=2 | k=3 |"
    assert lines[1] == "|---|---|---|---|---|---|"
    assert lines[2] == "| t-a | 1,234 | 0.50 | 1.00 | 0.25 | nan |"
    assert lines[3] == "| t-b | 56,789 | 0.75 | 1.00 | nan | 0.50 |"
    assert lines[4].startswith("| ext | ? | n/a |")
    assert {line.count("|") for line in lines} == {7}
    assert len(lines) == 5


def test_accuracy_table_shows_held_out_loss_when_reported():
    entries = [
        LadderEntry("t-a", Path("a"), {"accuracy": 0.0, "by_difficulty": {2: 0.0}, "loss": 7.5}, 9),
        LadderEntry("ext", Path("b"), {"accuracy": 0.25, "by_difficulty": {2: 0.25}}, None),
    ]
    lines = accuracy_table(entries).splitlines()
    assert lines[0] == "| teacher | params | all | loss | k=2 |"
    assert lines[2] == "| t-a | 9 | 0.00 | 7.500 | 0.00 |"
    assert lines[3] == "| ext | ? | 0.25 | - | 0.25 |"


# ------------------------------------------------ training several teachers at once, and fast


def _tokens_equal(a, b) -> None:
    for field in ("input_ids", "attention_mask", "loss_mask"):
        got, want = getattr(a, field), getattr(b, field)
        assert got.dtype == want.dtype and got.shape == want.shape, field
        assert (got == want).all(), field


@pytest.mark.parametrize("max_length", [None, 12])
def test_pre_encoded_batches_equal_encode_examples(tok, data, max_length):
    """train_teacher tokenizes the training set once: each step's batch must be exactly what
    encode_examples makes of the same rows (ids, padding, loss mask, truncation)."""
    train = data[0]
    rows = ladder_mod._TokenRows.encode(tok, train, max_length, ladder_mod._PLAIN)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = rng.integers(0, len(train), 8)
        want = encode_examples(tok, [train[i] for i in idx], max_length)
        _tokens_equal(rows.batch(idx), want)
    short = rows.batch(np.array([0]))  # one row: padded to its own length, no wider
    assert short.input_ids.shape == (1, min(max_length or 10**9, len(rows.rows[0][0])))


def test_pre_encoded_batches_equal_encode_examples_in_chat_format():
    from clpd_ray.data.loaders import load_examples
    from clpd_ray.data.prompt_format import PromptFormat

    qwen3 = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen3"
    if not (qwen3 / "tokenizer.json").is_file():
        pytest.skip("the Qwen3 tokenizer is not in ../shared")
    qtok = load_tokenizer(qwen3)
    fmt = PromptFormat(chat_template=True, system_prompt="Solve it.")
    examples = load_examples(
        "sample:gsm8k/test.jsonl", prompt_field="question", cot_field="answer", chat=True
    )[:40]
    rows = ladder_mod._TokenRows.encode(qtok, examples, 96, fmt)
    idx = np.array([3, 0, 39, 3, 17])
    _tokens_equal(rows.batch(idx), encode_examples(qtok, [examples[i] for i in idx], 96, fmt))


def _weights(entry: LadderEntry) -> bytes:
    return (entry.path / "model.safetensors").read_bytes()


def test_missing_teachers_train_in_worker_processes(tmp_path, tok, data, capsys):
    """Two teachers in two spawned processes: both trained and cached where the keys say, one
    line per teacher on the console, and byte-identical weights and scores to training them
    here with the workers' thread count (the thread count changes the order of float sums, so
    the weights are the same for the same count)."""
    from clpd_ray.distill.ladder_pool import cpu_count

    cfg = _config(tmp_path / "a")
    first = ensure_ladder(cfg, tok, *data, progress=True, workers=2)
    printed = capsys.readouterr().out
    assert [e.name for e in first] == ["t-a", "t-b"]
    for e, spec in zip(first, cfg.teachers.ladder, strict=True):
        assert e.path == tmp_path / "a" / "teachers" / f"{spec.name}-{teacher_cache_key(cfg, spec)}"
        assert e.accuracy["train_steps"] == 5 and e.accuracy["n"] == 30
        assert f"teacher {spec.name}: {e.parameters:,} params" in printed
    assert multiprocessing.active_children() == []

    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cpu_count() // 2))  # each of the two workers' share
    try:
        here = _ensure(_config(tmp_path / "here"), tok, data)
    finally:
        torch.set_num_threads(threads)
    assert [_weights(e) for e in here] == [_weights(e) for e in first]
    assert [e.accuracy["by_difficulty"] for e in here] == [
        e.accuracy["by_difficulty"] for e in first
    ]


def test_a_worker_error_is_raised_as_itself_and_ends_the_pool(tmp_path, tok, data):
    """t-b has too few positions for the task's rows: its worker fails on its first step. The
    driver raises the error training it here raises (same type, same message), and ends the
    other worker at once: t-a (100,000 steps, minutes of work) is never finished, and no worker
    process is left behind."""
    long_a = {**TEACHERS[0], "train_steps": 100_000}
    bad_b = {**TEACHERS[1], "max_positions": 16}
    with pytest.raises(Exception) as here:
        _ensure(_config(tmp_path / "here", teachers=[bad_b]), tok, data)
    cfg = _config(tmp_path / "pool", teachers=[long_a, bad_b])
    with pytest.raises(type(here.value)) as there:
        ensure_ladder(cfg, tok, *data, progress=False, workers=2)
    assert str(there.value) == str(here.value)
    assert multiprocessing.active_children() == []
    a_dir = tmp_path / "pool" / "teachers" / f"t-a-{teacher_cache_key(cfg, cfg.teachers.ladder[0])}"
    assert not (a_dir / "accuracy.json").exists()  # abandoned, not waited for


def test_worker_count(monkeypatch):
    from clpd_ray.distill.ladder_pool import WORKERS_ENV, cpu_count, worker_count

    demo = [1500, 1500, 1500]  # configs/demo.yaml's ladder
    monkeypatch.delenv(WORKERS_ENV, raising=False)
    assert worker_count([1500]) == 1
    assert worker_count(demo) == max(1, min(3, cpu_count() // 2))  # two threads per worker
    assert worker_count([10, 10, 10]) == 1  # tiny teachers: quicker than starting workers
    assert worker_count([1500, 100, 100]) == 1  # 200 steps to move off the longest: not worth it
    assert worker_count([10, 10], requested=2) == 2
    assert worker_count([1500], requested=4) == 1  # never more processes than teachers
    monkeypatch.setenv(WORKERS_ENV, "1")
    assert worker_count(demo) == 1
    monkeypatch.setenv(WORKERS_ENV, "2")
    assert worker_count([10, 10, 10]) == 2
    for raw in ("0", "two"):
        monkeypatch.setenv(WORKERS_ENV, raw)
        with pytest.raises(ConfigError, match=WORKERS_ENV):
            worker_count(demo)
