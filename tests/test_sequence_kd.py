"""Sequence-level KD across tokenizer families: re-tokenization, verification, caching, checks.

The student and the teacher have genuinely different tokenizers here: the embedded character
tokenizer and a byte-level BPE trained in the test (or the real Qwen3 tokenizer when
``../shared`` holds it). What is asserted is what the student trains on: its ids, decoded with
its own tokenizer, are the teacher's text.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.task import TASK_ALPHABET, generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer, load_tokenizer
from clpd_ray.distill.sequence import (
    ChainCache,
    SequenceSettings,
    chain_seed,
    chains_to_batch,
    same_vocab,
    settings_per_teacher,
    summarise_counts,
)
from clpd_ray.messages import Batch

PLAIN = PromptFormat()
QWEN3 = Path(__file__).resolve().parents[1].parent / "shared" / "tokenizers" / "qwen3"


def bpe_tokenizer(texts: list[str], vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A BPE trained on ``texts``: merges make multi-character tokens, so its ids and lengths
    differ from the character tokenizer's. Its alphabet is the task's (plus a space), so even a
    random model's output is text the character tokenizer can hold."""
    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_next")
    core.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        initial_alphabet=[*TASK_ALPHABET, " "],
        limit_alphabet=len(TASK_ALPHABET) + 1,
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return generate_examples(200, 3, 0, "train")


@pytest.fixture(scope="module")
def bpe(examples) -> PreTrainedTokenizerFast:
    return bpe_tokenizer([e.prompt + e.target for e in examples])


def gold_batch(examples: list[Example], step: int = 3) -> Batch:
    """What the planner sends a teacher: prompts, gold targets and answers (ids unused here)."""
    n = len(examples)
    return Batch(
        step=step,
        stage=0,
        input_ids=np.zeros((n, 1), dtype=np.int64),
        attention_mask=np.ones((n, 1), dtype=np.int64),
        loss_mask=np.zeros((n, 1), dtype=bool),
        example_ids=np.arange(100, 100 + n),
        prompts=tuple(e.prompt for e in examples),
        targets=tuple(e.target for e in examples),
        answers=tuple(e.answer for e in examples),
    )


def target_texts(tok, batch: Batch, fmt: PromptFormat = PLAIN) -> list[str]:
    """Each row's scored tokens (loss_mask[t] scores token t+1), decoded; in plain format
    without the eos the encoder appends."""
    out = []
    for ids, mask in zip(batch.input_ids, batch.loss_mask, strict=True):
        scored = [int(i) for i in ids[np.nonzero(mask)[0] + 1]]
        if not fmt.end_text(tok):
            assert scored.pop() == tok.eos_token_id
        out.append(tok.decode(scored))
    return out


def assert_reads(tok, batch: Batch, chains: list[str], fmt: PromptFormat = PLAIN) -> None:
    """The student's row i is its tokens of prompt_i + chain_i (+ end), and the scored tokens
    are the chain's: they decode to the chain, preceded at most by the part of one token that
    straddles the prompt/chain boundary (tokenized together, data/batching.py)."""
    scored = target_texts(tok, batch, fmt)
    end = fmt.end_text(tok)
    rows = zip(batch.input_ids, batch.attention_mask, batch.prompts, chains, scored, strict=True)
    for row, attn, prompt, chain, got in rows:
        real = [int(i) for i in row[attn.astype(bool)]]
        if not end:  # plain format: the encoder appended the eos token
            assert real.pop() == tok.eos_token_id
        prompt_text = fmt.prompt_text(tok, prompt)
        assert tok.decode(real) == prompt_text + chain + end
        assert got.endswith(chain + end)
        straddle = got[: len(got) - len(chain + end)]
        assert prompt_text.endswith(straddle) and len(straddle) < len(prompt_text)


def teacher_generates(teacher_tok, texts: list[str]) -> list[str]:
    """Text as a teacher produces it: ids in the teacher's vocabulary, decoded by the teacher."""
    ids = teacher_tok(texts, add_special_tokens=False)["input_ids"]
    return teacher_tok.batch_decode(ids, skip_special_tokens=True)


def test_the_two_tokenizers_really_differ(bpe, examples):
    char = build_char_tokenizer()
    assert not same_vocab(char, bpe) and same_vocab(char, build_char_tokenizer())
    text = examples[0].target
    assert len(bpe(text)["input_ids"]) < len(char(text)["input_ids"])  # BPE merged characters


def test_student_ids_decode_to_the_teachers_text_bpe_teacher_char_student(bpe, examples):
    char = build_char_tokenizer()
    ex = examples[:6]
    chains = teacher_generates(bpe, [e.target for e in ex])
    settings = SequenceSettings(max_new_tokens=32)
    out = chains_to_batch("t0", gold_batch(ex), chains, char, settings)
    b = out.batch
    assert target_texts(char, b) == chains
    # The full rows are prompt + chain + eos in the student's vocabulary, nothing of the teacher's.
    for row, e, c in zip(b.input_ids, ex, chains, strict=True):
        real = [int(i) for i in row if int(i) != char.pad_token_id]
        assert real == char(e.prompt + c, add_special_tokens=False)["input_ids"] + [
            char.eos_token_id
        ]
    assert b.input_ids.max() < len(char)
    assert out.generated == 6 and out.accepted == 6 and out.correct == 6 and out.dropped == 0


def test_student_ids_decode_to_the_teachers_text_char_teacher_bpe_student(bpe, examples):
    char = build_char_tokenizer()
    ex = examples[10:15]
    chains = teacher_generates(char, [e.target for e in ex])
    out = chains_to_batch("t0", gold_batch(ex), chains, bpe, SequenceSettings(max_new_tokens=32))
    assert_reads(bpe, out.batch, chains)
    # Fewer student tokens than characters: the ids are BPE's, not the teacher's re-used.
    assert out.batch.attention_mask.sum() < sum(
        len(e.prompt + c) + 1 for e, c in zip(ex, chains, strict=True)
    )


@pytest.mark.skipif(not QWEN3.is_dir(), reason="needs ../shared/tokenizers/qwen3")
@pytest.mark.parametrize("chat", [False, True])
def test_real_qwen3_student_reads_a_char_teachers_text(examples, chat):
    qwen = load_tokenizer(QWEN3)
    char = build_char_tokenizer()
    ex = [
        Example("Question: 3 apples and 4 pears?\nAnswer:", " 3+4=7;\n#### 7", "7", 1),
        *examples[20:23],
    ]
    chains = [" 3+4=7;\n#### 7", *teacher_generates(char, [e.target for e in ex[1:]])]
    fmt = PromptFormat(chat_template=chat)
    out = chains_to_batch("t0", gold_batch(ex), chains, qwen, SequenceSettings(16, fmt=fmt))
    assert_reads(qwen, out.batch, chains, fmt)
    assert len(qwen) > 150_000 and out.batch.input_ids.max() < len(qwen)


def chains_with_errors(ex: list[Example]) -> list[str]:
    """Even rows right (the gold chain), odd rows with a wrong final answer."""
    return [
        e.target if i % 2 == 0 else e.target.rsplit("#", 1)[0] + f"#{(int(e.answer) + 1) % 10}"
        for i, e in enumerate(ex)
    ]


def test_verify_replaces_rejected_chains_with_the_gold_cot(bpe, examples):
    ex = examples[:6]
    chains = chains_with_errors(ex)
    chains = [c.replace(";", "; ") for c in chains]  # teacher text distinct from the gold CoT
    s = SequenceSettings(32, verify=True, on_reject="gold", extractor=AnswerExtractor())
    out = chains_to_batch("t1", gold_batch(ex), chains, bpe, s)
    want = [c if i % 2 == 0 else e.target for i, (c, e) in enumerate(zip(chains, ex, strict=True))]
    assert_reads(bpe, out.batch, want)
    assert out.batch.targets == tuple(want)
    assert list(out.batch.example_ids) == list(range(100, 106))
    assert (out.generated, out.correct, out.accepted, out.gold_rows, out.dropped) == (6, 3, 3, 3, 0)


def test_verify_skip_drops_rejected_rows(bpe, examples):
    ex = examples[:6]
    chains = chains_with_errors(ex)
    out = chains_to_batch(
        "t1", gold_batch(ex), chains, bpe, SequenceSettings(32, verify=True, on_reject="skip")
    )
    assert list(out.batch.example_ids) == [100, 102, 104]
    assert out.batch.prompts == tuple(ex[i].prompt for i in (0, 2, 4))
    assert_reads(bpe, out.batch, [chains[i] for i in (0, 2, 4)])
    assert (out.accepted, out.gold_rows, out.dropped) == (3, 0, 3)


def test_every_chain_rejected_with_skip_trains_on_gold(bpe, examples):
    ex = examples[:4]
    wrong = ["#x"] * 4
    out = chains_to_batch(
        "t1", gold_batch(ex), wrong, bpe, SequenceSettings(32, verify=True, on_reject="skip")
    )
    assert_reads(bpe, out.batch, [e.target for e in ex])
    assert out.batch.num_target_tokens > 0
    assert (out.accepted, out.gold_rows, out.dropped) == (0, 4, 0)


def test_without_verify_wrong_chains_are_kept_and_counted(bpe, examples):
    ex = examples[:4]
    chains = chains_with_errors(ex)
    out = chains_to_batch("t1", gold_batch(ex), chains, bpe, SequenceSettings(32))
    assert_reads(bpe, out.batch, chains)
    assert (out.correct, out.accepted) == (2, 4)


def test_chains_longer_than_max_length_are_dropped_or_truncated(bpe, examples):
    ex = examples[:4]
    chains = [ex[0].target * 20, *(e.target for e in ex[1:])]
    width = max(len(bpe(e.prompt + e.target)["input_ids"]) for e in ex) + 1  # gold rows fit
    drop = SequenceSettings(32, max_length=width, overlong="drop")
    out = chains_to_batch("t", gold_batch(ex), chains, bpe, drop)
    assert list(out.batch.example_ids) == [101, 102, 103] and out.batch.input_ids.shape[1] <= width
    assert (out.accepted, out.gold_rows, out.dropped) == (3, 0, 1)
    assert_reads(bpe, out.batch, chains[1:])
    cut = SequenceSettings(32, max_length=width, overlong="truncate")
    out = chains_to_batch("t", gold_batch(ex), chains, bpe, cut)
    assert out.batch.input_ids.shape == (4, width) and out.dropped == 0
    # Only the long chain dropped, and it was the only one: the step trains on the gold CoT.
    alone = chains_to_batch("t", gold_batch(ex[:1]), chains[:1], bpe, drop)
    assert (alone.accepted, alone.gold_rows, alone.dropped) == (0, 1, 0)
    assert_reads(bpe, alone.batch, [ex[0].target])


def test_summarise_counts_adds_per_teacher():
    rows = [
        {"teacher": "a", "generated": 4, "cached": 0, "correct": 3, "accepted": 3, "gold_rows": 1, "dropped": 0},
        {"teacher": "b", "generated": 4, "cached": 4, "correct": 1, "accepted": 1, "gold_rows": 0, "dropped": 3},
        {"teacher": "a", "generated": 4, "cached": 2, "correct": 2, "accepted": 2, "gold_rows": 2, "dropped": 0},
    ]  # fmt: skip
    s = summarise_counts(rows)
    assert s["a"]["generated"] == 8 and s["a"]["accepted"] == 5 and s["a"]["rate"] == 0.625
    assert s["b"]["rate"] == 0.25 and s["b"]["dropped"] == 3
    assert summarise_counts([]) == {}


def test_chain_cache_keys_teacher_example_and_decoding():
    cache = ChainCache()
    greedy = SequenceSettings(16)
    cache.store("t0", [1, 2], ["a", "b"], greedy)
    assert cache.lookup("t0", [2, 1, 3], greedy) == ["b", "a", None]
    assert cache.lookup("t1", [1], greedy) == [None]  # another teacher
    assert cache.lookup("t0", [1], SequenceSettings(17)) == [None]  # another budget
    assert cache.lookup("t0", [1], SequenceSettings(16, fmt=PromptFormat(True))) == [None]
    sample = SequenceSettings(16, decoding="sample")
    cache.store("t0", [5], ["s"], sample)  # sampled chains are never cached
    assert cache.lookup("t0", [5, 1], sample) == [None, None]
    assert len(cache) == 2 and cache.hits == 2


def test_chain_seed_is_a_function_of_run_seed_and_step():
    assert chain_seed(0, 5) == chain_seed(0, 5)
    seeds = {chain_seed(r, s) for r in range(3) for s in range(50)}
    assert len(seeds) == 150 and all(0 <= x < 2**32 for x in seeds)


def test_settings_from_config(tiny_config):
    c = tiny_config(
        "distill.objective=sequence",
        "distill.decoding=sample",
        "distill.sample_temperature=0.7",
        "distill.verify=true",
        "distill.on_reject=skip",
        "seed=9",
    )
    s = SequenceSettings.from_config(c, default_max_new_tokens=21)
    assert (s.max_new_tokens, s.decoding, s.temperature, s.verify, s.on_reject, s.seed) == (
        21,
        "sample",
        0.7,
        True,
        "skip",
        9,
    )
    assert s.cache_key() is None
    c2 = tiny_config("distill.objective=sequence", "distill.max_new_tokens=5")
    assert SequenceSettings.from_config(c2, 21).max_new_tokens == 5


def test_each_teacher_gets_a_budget_in_its_own_tokens(tiny_config, bpe, examples):
    char = build_char_tokenizer()
    refs = examples[:50]
    config = tiny_config("distill.objective=sequence")
    same, finer = settings_per_teacher(config, bpe, [bpe, char], refs, 7)
    assert same.max_new_tokens == 7  # the student's own tokenizer: the workload's budget
    # One character per token, plus the eos, plus one token of margin.
    assert finer.max_new_tokens == max(len(e.target) for e in refs) + 2
    fixed = tiny_config("distill.objective=sequence", "distill.max_new_tokens=5")
    assert [s.max_new_tokens for s in settings_per_teacher(fixed, bpe, [bpe, char], refs, 7)] == [
        5,
        5,
    ]


# ----------------------------------------------------------------- the teacher actor, in-process


def save_model(tmp: Path, tok, name: str, seed: int = 0) -> Path:
    from clpd_ray.config import TeacherSpec
    from clpd_ray.distill.models import build_model

    out = tmp / name
    spec = TeacherSpec(name=name, n_layer=1, n_embd=16, n_head=2)
    build_model(spec, tok, seed=seed).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_teacher_service_generates_in_its_tokens_and_hands_back_the_students(
    tmp_path, bpe, examples
):
    from clpd_ray.runtime.actors.teacher import TeacherService

    char = build_char_tokenizer()
    student_dir = tmp_path / "student-tok"
    char.save_pretrained(student_dir)
    teacher = TeacherService(
        "t0", 0, save_model(tmp_path, bpe, "t0"), top_k=4, student_tokenizer_dir=student_dir
    )
    ex = examples[:5]
    batch = gold_batch(ex, step=7)
    greedy = SequenceSettings(max_new_tokens=6)
    out, counts = teacher.generate(batch, greedy)
    assert counts == out.counts() and counts["generated"] == 5 and counts["cached"] == 0
    # What the teacher wrote, in its own tokens, is what the student reads in its own.
    from clpd_ray.distill.training import generate_texts

    chains = generate_texts(teacher.model, bpe, list(batch.prompts), max_new_tokens=6)
    assert any(chains) and target_texts(char, out.batch) == [c.rstrip() for c in chains]
    again, counts2 = teacher.generate(batch, greedy)
    assert counts2["cached"] == 5
    np.testing.assert_array_equal(again.batch.input_ids, out.batch.input_ids)
    # Sampling: not cached, the same chains for the same (run seed, step), others for another step.
    sample = SequenceSettings(max_new_tokens=6, decoding="sample", temperature=1.5, seed=1)
    s1, c1 = teacher.generate(batch, sample)
    s2, _ = teacher.generate(batch, sample)
    assert c1["cached"] == 0
    np.testing.assert_array_equal(s1.batch.input_ids, s2.batch.input_ids)
    other = [
        teacher.generate(gold_batch(ex, step=k), sample)[0].batch.input_ids.tolist()
        for k in range(8, 12)
    ]
    assert any(o != s1.batch.input_ids.tolist() for o in other)


# ----------------------------------------------------------------- checks before anything starts


def test_token_kd_between_tokenizers_stops_before_training_teachers(tmp_path, bpe, tiny_config):
    from clpd_ray.errors import TokenizerMismatchError
    from clpd_ray.runtime.run import run_distillation

    teacher = save_model(tmp_path, bpe, "bpe-teacher")
    ladder = [
        {"name": "t0", "n_layer": 1, "n_embd": 16, "n_head": 2, "train_steps": 10},
        {"name": "t1", "path": str(teacher)},
    ]
    cache = tmp_path / "cache"
    config = tiny_config(
        "curriculum.num_stages=2", teachers={"ladder": ladder, "cache_dir": str(cache)}
    )
    out = tmp_path / "run"
    with pytest.raises(TokenizerMismatchError, match=r"teacher t1 tokenizer .*bpe-teacher"):
        run_distillation(config, out, progress=False)
    assert not out.exists()
    assert not (cache / "teachers").exists()  # t0 was not trained


def test_cli_token_kd_between_tokenizers_exits_2(tmp_path, bpe, tiny_config, capsys):
    from clpd_ray.cli import main

    teacher = save_model(tmp_path, bpe, "bpe-teacher")
    cfg = tiny_config().to_dict()
    cfg["teachers"]["ladder"] = [{"name": "t0", "path": str(teacher)}]
    cfg["curriculum"]["num_stages"] = 1
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    code = main(["run", str(path), "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err
    assert "distill.objective=sequence" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------- one Ray run


@pytest.mark.ray
@pytest.mark.slow
def test_sequence_kd_runs_between_tokenizer_families(ray_cluster, tiny_config, tmp_path):
    """Char-tokenizer teachers (trained on the task) teach a BPE student: probes run without the
    KL part, and summary.json reports each teacher's acceptance rate."""
    from clpd_ray.distill.ladder import ensure_ladder
    from clpd_ray.runtime.run import run_distillation

    base = tiny_config()
    char = build_char_tokenizer()
    train = generate_examples(300, 3, 0, "train")
    entries = ensure_ladder(base, char, train, generate_examples(30, 3, 0, "eval"), progress=False)
    bpe_dir = tmp_path / "bpe"
    bpe_tokenizer([e.prompt + e.target for e in train]).save_pretrained(bpe_dir)
    # Checkpoints as a user brings them: no accuracy.json, so the run scores them itself.
    paths = []
    for e in entries[:2]:
        paths.append(tmp_path / "models" / e.name)
        shutil.copytree(e.path, paths[-1], ignore=shutil.ignore_patterns("accuracy.json"))
    config = tiny_config(
        "distill.objective=sequence",
        "distill.verify=true",
        "distill.on_reject=gold",
        "train.total_steps=6",
        "train.log_every=2",
        "train.checkpoint_every=5",
        "scheduler.policy=adaptive",
        "scheduler.probe_every=3",
        "curriculum.num_stages=2",
        teachers={"ladder": [{"name": p.name, "path": str(p)} for p in paths]},
        student={"tokenizer": str(bpe_dir)},
    )
    out = tmp_path / "run"
    summary = run_distillation(config, out, progress=False)
    seq = summary["sequence_kd"]
    assert set(seq) <= {"t0", "t1"} and seq
    assert sum(t["generated"] for t in seq.values()) == 6 * config.train.batch_size
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["kd_loss"] == 0.0 and m["ce_loss"] > 0 for m in metrics)
    for t in seq.values():
        assert (
            0 <= t["accepted"] <= t["generated"]
            and t["accepted"] + t["gold_rows"] == t["generated"]
        )
        assert t["rate"] == pytest.approx(t["accepted"] / t["generated"], abs=1e-4)
    # Teachers given by path were scored on their own actors at the end, like built ones.
    for name in ("t0", "t1"):
        scored = summary["teachers"][name]
        assert scored["accuracy"] is not None and scored["parameters"] > 0, scored
    assert (out / "eval" / "predictions.jsonl").is_file()
    # The probes ran on the student's tokens, without the KL part (no teacher scores them).
    state = json.loads((out / "checkpoints" / "step-0000005" / "controller.json").read_text())
    probes = [p for results in state["probes"].values() for p in results]
    assert probes and all(p["kl_to_teacher"] == [] and np.isfinite(p["loss"]) for p in probes)
    assert (out / "student" / "tokenizer.json").is_file()
    student_tok = load_tokenizer(out / "student")
    assert not same_vocab(student_tok, char)
