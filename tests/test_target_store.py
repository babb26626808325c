"""The teacher target store: keys, invalidation, part files, serving, work ahead (mostly no Ray).

The Ray end-to-end test at the bottom (slow) checks that runs with the store cold, warm (a
shared store filled by an earlier run), with and without work ahead, end with the same student,
bit for bit, and that idle teachers of an adaptive run work ahead.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TWO_RUNGS

from clpd_ray.config import TeacherSpec, apply_overrides, config_from_dict
from clpd_ray.curriculum.difficulty import step_scores
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.distill.models import build_model
from clpd_ray.distill.target_store import (
    join_rows,
    pack_part,
    row_keys,
    split_rows,
    teacher_key,
    unpack_part,
)
from clpd_ray.errors import ConfigError
from clpd_ray.messages import Batch
from clpd_ray.policies import resolve_policy
from clpd_ray.runtime import storage
from clpd_ray.runtime.actors.teacher import TeacherService
from clpd_ray.runtime.planner import Planner
from clpd_ray.runtime.target_store import TargetStore, store_location
from clpd_ray.workload import Workload

TOK = build_char_tokenizer()
EXAMPLES = generate_examples(24, 3, 0, "train")


def _model_dir(path: Path, seed: int) -> Path:
    spec = TeacherSpec(name="t", arch="qwen3", n_layer=2, n_embd=64, n_head=2)
    build_model(spec, TOK, seed=seed).save_pretrained(path)
    TOK.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return _model_dir(tmp_path_factory.mktemp("teacher"), seed=3)


def batch_of(rows: list[int], step: int = 0) -> Batch:
    enc = encode_examples(TOK, [EXAMPLES[i] for i in rows])
    return Batch(step, 0, enc.input_ids, enc.attention_mask, enc.loss_mask, np.asarray(rows))


def teacher(model_dir: Path, store: Path | str | None, **kw) -> TeacherService:
    kw = {"top_k": 6, "target_dtype": "float32", **kw}
    return TeacherService(
        "t", 0, model_dir, target_store=None if store is None else str(store), **kw
    )


def per_row(t: TeacherService, batch: Batch) -> list[np.ndarray]:
    """The targets of each row of ``batch`` (compact rows of that example), from ``t``."""
    out = t.targets(batch)
    return [lp for lp, _ in split_rows(out.logprobs, out.ids, batch.loss_mask)]


# ---------------------------------------------------------------------- keys


def test_row_keys_follow_example_and_tokenization_not_padding():
    a = batch_of([0, 1, 2])
    wide = batch_of([0, 1, 2, 5])  # row 0..2 padded to another width when 5 is longer
    keys = row_keys(a.example_ids, a.input_ids, a.attention_mask, a.loss_mask)
    assert len(set(keys)) == 3
    assert (
        keys == row_keys(wide.example_ids, wide.input_ids, wide.attention_mask, wide.loss_mask)[:3]
    )
    ids, attn, mask = a.input_ids.copy(), a.attention_mask.copy(), a.loss_mask.copy()
    ids[1, 2] += 1  # another token
    assert row_keys(a.example_ids, ids, attn, mask)[1] != keys[1]
    mask[1, int(np.flatnonzero(mask[1])[0])] = False  # another scored position
    assert row_keys(a.example_ids, a.input_ids, attn, mask)[1] != keys[1]
    other_id = np.asarray([0, 7, 2])  # the same tokens under another example id
    assert row_keys(other_id, a.input_ids, a.attention_mask, a.loss_mask)[1] != keys[1]
    assert row_keys(other_id, a.input_ids, a.attention_mask, a.loss_mask)[0] == keys[0]


def test_teacher_key_changes_with_each_setting():
    base = teacher_key("fp", 8, 1.0, "float16")
    others = [
        teacher_key("fp2", 8, 1.0, "float16"),
        teacher_key("fp", 9, 1.0, "float16"),
        teacher_key("fp", 8, 1.5, "float16"),
        teacher_key("fp", 8, 1.0, "bfloat16"),
    ]
    assert len({base, *others}) == 5
    assert base == teacher_key("fp", 8, 1.0, "float16")


def test_parts_round_trip_and_a_damaged_part_is_refused():
    rng = np.random.default_rng(0)
    entries = [
        (rng.standard_normal((n, 4)).astype(np.float16), rng.integers(0, 50, (n, 4), np.int32))
        for n in (3, 0, 5)
    ]
    keys = ["a" * 64, "b" * 64, "c" * 64]
    back = unpack_part(pack_part(keys, entries))
    assert list(back) == keys
    for k, (lp, ids) in zip(keys, entries, strict=True):
        np.testing.assert_array_equal(back[k][0], lp)
        np.testing.assert_array_equal(back[k][1], ids)
        assert back[k][0].dtype == np.float16 and back[k][1].dtype == np.int32
    lp, ids = join_rows(entries, 4, np.dtype(np.float16))
    assert lp.shape == ids.shape == (8, 4)
    with pytest.raises(ValueError, match="not a target-store part"):
        unpack_part(pack_part(keys, entries)[:50])


def test_store_location_from_the_config(tmp_path):
    def config(*items: str):
        return config_from_dict(apply_overrides({}, list(items)), "test")

    assert store_location(config(), "/runs/a") is None  # a run batches its teachers by default
    assert store_location(config("teachers.target_store=run"), "/runs/a") == "/runs/a/targets"
    assert store_location(config("teachers.target_store=off"), "/runs/a") is None
    shared = store_location(config(f"teachers.target_store={tmp_path}/t"), "/runs/a")
    assert shared == str(tmp_path / "t")
    assert store_location(config_from_dict({"teachers": {"target_store": False}}), "/r") is None
    with pytest.raises(ConfigError, match=r"teachers\.target_store"):
        config("teachers.target_store=' '")
    s3 = store_location(config("teachers.target_store=s3://b/x/"), "/runs/a")
    assert s3 == "s3://b/x"
    assert store_location(config("distill.objective=sequence"), "/runs/a") is None


# ---------------------------------------------------------------------- serving


def test_stored_targets_are_the_same_bits_whatever_batch_computed_them(teacher_dir, tmp_path):
    """Each example is computed alone, so a target read from the store equals the one any
    batch would compute; rows come back in batch order (the compact layout)."""
    cold = teacher(teacher_dir, tmp_path / "s")
    first = per_row(cold, batch_of([3, 0, 7, 1]))
    # Another teacher process on the same store, a batch mixing stored and new examples.
    warm = teacher(teacher_dir, tmp_path / "s")
    mixed = batch_of([7, 9, 3, 3, 12])  # example 3 twice (a batch may span an epoch boundary)
    got = per_row(warm, mixed)
    assert warm.store().stats() == {"hits": 3, "misses": 2, "ahead": 0}
    alone = teacher(teacher_dir, tmp_path / "other")  # reference: a fresh store, one by one
    for row, example in enumerate([7, 9, 3, 3, 12]):
        (ref,) = per_row(alone, batch_of([example]))
        np.testing.assert_array_equal(got[row], ref)
    np.testing.assert_array_equal(got[0], first[2])
    np.testing.assert_array_equal(got[2], first[0])
    out = warm.targets(mixed)
    assert out.logprobs.shape[0] == mixed.num_target_tokens
    assert warm.store().stats()["misses"] == 2  # all hits the second time
    # Without a store (teachers.target_store: off) the batch is computed whole: the same ids, and
    # log-probabilities equal up to the last bits of batched float arithmetic.
    off = teacher(teacher_dir, None).targets(mixed)
    np.testing.assert_array_equal(off.ids, out.ids)
    np.testing.assert_allclose(off.logprobs, out.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    ["weights", "top_k", "temperature", "target_dtype", "tokens", "loss_mask", "example_id"],
)
def test_a_target_is_never_served_for_another_teacher_setting_or_tokenization(
    teacher_dir, tmp_path, change
):
    store = tmp_path / "s"
    batch = batch_of([4, 5])
    teacher(teacher_dir, store).targets(batch)
    kw: dict = {}
    model_dir = teacher_dir
    if change == "weights":
        model_dir = _model_dir(tmp_path / "other-weights", seed=4)
    elif change == "top_k":
        kw["top_k"] = 5
    elif change == "temperature":
        kw["temperature"] = 2.0
    elif change == "target_dtype":
        kw["target_dtype"] = "float16"
    ids, attn, mask = batch.input_ids.copy(), batch.attention_mask.copy(), batch.loss_mask.copy()
    example_ids = batch.example_ids.copy()
    if change == "tokens":
        ids[0, 3] = (ids[0, 3] + 1) % 20 + 3
    elif change == "loss_mask":
        mask[0, int(np.flatnonzero(mask[0])[-1])] = False
    elif change == "example_id":
        example_ids[0] = 99
    asked = Batch(0, 0, ids, attn, mask, example_ids)
    t = teacher(model_dir, store, **kw)
    out = t.targets(asked)
    stats = t.store().stats()
    assert stats["misses"] >= 1, stats
    if change in ("tokens", "loss_mask", "example_id"):
        assert stats == {"hits": 1, "misses": 1, "ahead": 0}  # row 1 is unchanged: served
    # What was served is what this teacher computes for exactly this input.
    ref = teacher(model_dir, tmp_path / "fresh", **kw).targets(asked)
    np.testing.assert_array_equal(out.logprobs, ref.logprobs)
    np.testing.assert_array_equal(out.ids, ref.ids)


def test_precompute_fills_the_store_and_a_damaged_part_is_recomputed(teacher_dir, tmp_path):
    t = teacher(teacher_dir, tmp_path / "s")
    assert t.precompute(batch_of([0, 1, 2], step=-1)) == 3
    assert t.precompute(batch_of([1, 2, 3], step=-1)) == 1
    out = t.targets(batch_of([2, 3, 0, 1]))
    assert t.store().stats() == {"hits": 4, "misses": 0, "ahead": 4}
    parts = sorted((Path(t.store().dir)).glob("part-*.npz"))
    assert len(parts) == 2
    for p in parts:  # damage every part: a new process recomputes rather than serving it
        p.write_bytes(p.read_bytes()[:40])
    again = teacher(teacher_dir, tmp_path / "s")
    out2 = again.targets(batch_of([2, 3, 0, 1]))
    assert again.store().stats()["misses"] == 4
    np.testing.assert_array_equal(out.logprobs, out2.logprobs)
    assert teacher(teacher_dir, None).precompute(batch_of([0])) == 0  # no store: nothing to do


def test_bfloat16_targets_go_through_the_store(teacher_dir, tmp_path):
    t = teacher(teacher_dir, tmp_path / "s", target_dtype="bfloat16")
    batch = batch_of([0, 1])
    a = t.targets(batch)
    b = teacher(teacher_dir, tmp_path / "s", target_dtype="bfloat16").targets(batch)
    assert a.logprobs.dtype == b.logprobs.dtype == np.uint16
    np.testing.assert_array_equal(a.logprobs, b.logprobs)
    wide = teacher(teacher_dir, None).targets(batch)
    expected = torch.tensor(wide.logprobs).to(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(b.logprobs_float32(), expected, atol=0.02)


def test_two_stores_on_one_location_see_each_others_parts(tmp_path):
    rng = np.random.default_rng(1)
    entry = (rng.standard_normal((2, 3)).astype(np.float32), np.zeros((2, 3), np.int32))
    a = TargetStore(str(tmp_path), "t", "k" * 64)
    b = TargetStore(str(tmp_path), "t", "k" * 64, refresh_s=0.0)
    slow = TargetStore(str(tmp_path), "t", "k" * 64, refresh_s=3600.0)
    local = TargetStore(str(tmp_path), "t", "k" * 64)  # a filesystem: listed on every miss
    assert local.refresh_s == 0.0
    assert b.get(["x"]) == [None] and slow.get(["x"]) == [None] and local.get(["x"]) == [None]
    a.put(["x"], [entry])
    (got,) = b.get(["x"])  # b refreshes its index on a miss
    assert got is not None and local.get(["x"])[0] is not None
    assert slow.get(["x"]) == [None]  # listed a moment ago: the miss is recomputed, not listed
    np.testing.assert_array_equal(got[0], entry[0])
    other = TargetStore(str(tmp_path), "t", "j" * 64)  # another teacher key: its own directory
    assert other.get(["x"]) == [None]


def test_parts_cached_in_memory_stay_within_the_budget(tmp_path):
    entry = (np.zeros((10, 4), np.float32), np.zeros((10, 4), np.int32))  # 320 bytes
    store = TargetStore(str(tmp_path), "t", "k" * 64, cache_bytes=1000)
    for i in range(5):
        store.put([f"e{i}"], [entry])
    assert sum(store._part_bytes.values()) <= 1000 and len(store._parts) == 3
    fresh = TargetStore(str(tmp_path), "t", "k" * 64, cache_bytes=1000)
    assert all(e is not None for e in fresh.get([f"e{i}" for i in range(5)]))  # re-read as needed


def test_the_store_works_on_s3(s3_bucket):
    store = TargetStore(storage.join(s3_bucket, "targets"), "t", "k" * 64)
    entry = (np.ones((3, 2), np.float16), np.arange(6, dtype=np.int32).reshape(3, 2))
    store.put(["e1"], [entry])
    fresh = TargetStore(storage.join(s3_bucket, "targets"), "t", "k" * 64)
    (got,) = fresh.get(["e1"])
    assert got is not None
    np.testing.assert_array_equal(got[1], entry[1])
    assert any(n.endswith(".keys") for n in storage.list_dir(fresh.dir))
    assert fresh.refresh_s == 30.0  # listing a bucket is a request: at most every 30 s


# ---------------------------------------------------------------------- work ahead (planner)


def _workload() -> Workload:
    train = generate_examples(90, 3, 0, "train")
    probe = generate_examples(30, 3, 0, "probe")
    return Workload(
        tokenizer=TOK,
        tokenizer_dir=Path("unused"),
        train=train,
        scores=step_scores(train),
        eval=generate_examples(6, 3, 0, "eval"),
        probe_pool=probe,
        probe_scores=step_scores(probe),
        ladder=[],
        max_new_tokens=16,
    )


@pytest.mark.parametrize("policy_name", ["clpd", "adaptive"])
def test_work_ahead_order_is_the_order_each_stage_is_served(policy_name):
    """What an idle teacher is sent ahead (planner.upcoming at step 0) is, in order, what its
    stage's steps draw: also when an adaptive policy decides the boundaries online."""
    ladder = [{"name": f"t{i}", "n_layer": 1, "n_embd": 8, "n_head": 2} for i in range(3)]
    raw = {
        "seed": 0,
        "task": {"max_difficulty": 3, "train_size": 90, "eval_size": 12},
        "teachers": {"ladder": ladder},
        "curriculum": {"num_stages": 3},
        "scheduler": {"policy": policy_name, "probe_every": 5, "probe_size": 4},
        "train": {"total_steps": 60, "batch_size": 4, "log_every": 5, "prefetch": 1},
    }
    config = config_from_dict(raw, "test")
    policy = resolve_policy(policy_name, None)
    policy.bind(num_stages=3, num_teachers=3, total_steps=60)
    planner = Planner(
        config,
        _workload(),
        policy_name=policy.name,
        curriculum=policy.curriculum,
        reads_probes=policy.reads_probes,
    )
    planner.start_clock(0.0)
    state = json.dumps(planner.sampler.state_dict())
    ahead = {}
    for i in (1, 2):
        (stream, stage), *rest = planner.ahead_streams(i)
        assert stream == f"stage/{stage}" and stage == i
        assert [s for s, _ in rest] == ([f"replay/{i}"] if planner.reads_probes else [])
        pool = len(planner.stages[stage])
        ahead[i] = np.concatenate(
            [planner.upcoming(stream, off, 7) for off in range(0, pool + 7, 7)]
        )
        assert sorted(ahead[i].tolist()) == sorted(planner.stages[stage].tolist())  # one epoch
    assert json.dumps(planner.sampler.state_dict()) == state  # peeking moves nothing
    from clpd_ray.messages import ProbeResult, StepResult

    replay_ahead = {i: planner.upcoming(f"replay/{i}", 0, 500).tolist() for i in (1, 2)}
    served: dict[int, list[int]] = {1: [], 2: []}
    replays: dict[int, list[int]] = {1: [], 2: []}
    for j in range(60):
        steps, probe = planner.missing(j)
        for i in steps:
            loss = 3.0 if i < 8 else 0.5  # a plateau an adaptive policy moves on at
            planner.record(StepResult(i, loss, 1.0, 0.0, 1e-3, 7, 0.1), now=float(i))
        if probe is not None:
            kl = (0.5, 0.5, 0.5)
            planner.record_probe(probe, tuple(ProbeResult(s, 0.1, 0.9, kl) for s in range(3)))
        before = policy.state_dict()
        plan = planner.plan(j, policy.decide(planner.observation(j)), before)
        stage = plan.decision.stage
        if stage in served:
            members = set(planner.stages[stage].tolist())
            rows = plan.batch.example_ids.tolist()
            served[stage] += [r for r in rows if r in members]  # replayed rows: another stream
            replays[stage] += [r for r in rows if r not in members]
    assert served[1] and served[2], "the policy never reached the later stages"
    assert bool(replays[1] and replays[2]) == (policy_name == "adaptive")
    for i in (1, 2):
        n = min(len(served[i]), len(ahead[i]))
        assert served[i][:n] == ahead[i][:n].tolist()
        assert replays[i] == replay_ahead[i][: len(replays[i])]


# ---------------------------------------------------------------------- end to end (Ray)


@pytest.mark.ray
@pytest.mark.slow
def test_store_cold_warm_and_work_ahead_end_with_the_same_student(
    ray_cluster, tiny_config, tmp_path
):
    """An adaptive run that fills a shared store with work ahead and a second run served from it
    without work ahead end with the same student, bit for bit; the idle teachers of the first
    worked ahead, and the second computed nothing. (A store of the run's own, under a replica
    kill: test_replicas.py.)"""
    from safetensors.torch import load_file

    from clpd_ray.runtime.run import run_distillation

    shared = tmp_path / "shared"
    runs = {
        "ahead": ("scheduler.policy=adaptive", f"teachers.target_store={shared}"),
        "warm": (
            "scheduler.policy=adaptive",
            f"teachers.target_store={shared}",
            "teachers.work_ahead=false",
        ),
    }
    summaries, students = {}, {}
    for name, overrides in runs.items():
        out = tmp_path / name
        config = tiny_config(*overrides, **TWO_RUNGS)
        summaries[name] = run_distillation(config, out, progress=False)
        students[name] = load_file(str(out / "student" / "model.safetensors"))
        decisions = (out / "decisions.jsonl").read_text()
        if name == "ahead":
            reference = decisions
        assert decisions == reference
    unequal = [
        k for k in students["ahead"] if not torch.equal(students["warm"][k], students["ahead"][k])
    ]
    assert not unequal, unequal
    ahead, warm = summaries["ahead"]["target_store"], summaries["warm"]["target_store"]
    assert ahead["t1"]["ahead"] > 0  # idle from step 0
    assert ahead["t0"]["ahead"] == 0  # in use from step 0
    assert all(c["misses"] == 0 and c["ahead"] == 0 for c in warm.values()), warm
    assert sum(c["hits"] for c in warm.values()) > 0
    assert not (tmp_path / "ahead" / "targets").exists() and list(shared.glob("*/part-*.keys"))
