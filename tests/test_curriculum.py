"""Curriculum stage splits and the resumable sampler."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from clpd_ray.curriculum.sampler import CurriculumSampler, split_stages
from clpd_ray.errors import DataError


def _check_partition(stages: list[np.ndarray], n: int) -> None:
    assert all(st.dtype == np.int64 and st.size > 0 for st in stages)
    assert all(np.all(np.diff(st) > 0) for st in stages)  # sorted, no duplicates
    np.testing.assert_array_equal(np.sort(np.concatenate(stages)), np.arange(n))


# --- split_stages ---------------------------------------------------------------------------------


def test_quantile_split_distinct_scores_is_equal_sized_and_monotone():
    scores = np.random.default_rng(0).normal(size=90)
    stages = split_stages(scores, 3)
    _check_partition(stages, 90)
    assert [len(st) for st in stages] == [30, 30, 30]
    for lo, hi in itertools.pairwise(stages):
        assert scores[lo].max() < scores[hi].min()


def test_quantile_split_keeps_ties_together():
    rng = np.random.default_rng(1)
    scores = rng.integers(2, 12, size=500).astype(float)  # like GSM8K step counts
    for k in (2, 3, 4, 5):
        stages = split_stages(scores, k)
        _check_partition(stages, 500)
        for lo, hi in itertools.pairwise(stages):
            assert scores[lo].max() < scores[hi].min()  # no score shared by two stages


def test_quantile_split_cuts_at_nearest_score_change():
    scores = np.array([1.0] * 28 + [2.0, 3.0])
    assert [len(st) for st in split_stages(scores, 3)] == [28, 1, 1]
    scores = np.array([1.0] * 10 + [2.0] * 12 + [3.0] * 8)
    assert [len(st) for st in split_stages(scores, 3)] == [10, 12, 8]


def test_quantile_split_splits_ties_only_when_it_must():
    scores = np.array([5.0] * 9 + [7.0])
    stages = split_stages(scores, 4)
    _check_partition(stages, 10)
    for lo, hi in itertools.pairwise(stages):
        assert scores[lo].max() <= scores[hi].min()
    assert scores[stages[-1]].tolist() == [7.0]  # the one distinct score keeps its own stage
    # Which tied examples go where depends on the seed only.
    again = split_stages(scores, 4, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(stages, again, strict=True))
    other = [split_stages(scores, 4, seed=s) for s in range(1, 6)]
    assert any(not np.array_equal(o[0], stages[0]) for o in other)


def test_single_stage_and_one_example_per_stage():
    scores = [3.0, 1.0, 2.0]
    (only,) = split_stages(scores, 1)
    np.testing.assert_array_equal(only, [0, 1, 2])
    assert [st.tolist() for st in split_stages(scores, 3)] == [[1], [2], [0]]


def test_random_split_same_sizes_different_members():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, size=200).astype(float)
    ordered = split_stages(scores, 3)
    shuffled = split_stages(scores, 3, mode="random", seed=7)
    _check_partition(shuffled, 200)
    assert [len(s) for s in shuffled] == [len(s) for s in ordered]
    assert not np.array_equal(shuffled[0], ordered[0])
    # Random stages are not sorted by difficulty: their mean scores are close.
    means = [scores[st].mean() for st in shuffled]
    assert max(means) - min(means) < 1.0
    again = split_stages(scores, 3, mode="random", seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(shuffled, again, strict=True))


def test_boundaries():
    scores = np.array([1, 2, 3, 4, 5, 6, 7, 8], dtype=float)
    stages = split_stages(scores, 3, boundaries=[2, 5.5])
    assert [st.tolist() for st in stages] == [
        [0, 1],
        [2, 3, 4],
        [5, 6, 7],
    ]  # (-inf,2], (2,5.5], rest
    rnd = split_stages(scores, 3, boundaries=[2, 5.5], mode="random", seed=1)
    assert [len(st) for st in rnd] == [2, 3, 3]
    _check_partition(rnd, 8)


def test_boundaries_empty_stage_error():
    with pytest.raises(
        DataError, match=r"stage 1 \(scores in \(2, 3\]\) is empty.*use fewer stages"
    ):
        split_stages([1.0, 2.0, 5.0, 6.0], 3, boundaries=[2, 3])
    with pytest.raises(ValueError, match="num_stages=3 needs 2"):
        split_stages([1.0, 2.0, 3.0], 3, boundaries=[1.5])
    with pytest.raises(ValueError, match="strictly increasing"):
        split_stages([1.0, 2.0, 3.0], 3, boundaries=[2, 2])


def test_too_few_examples_error():
    with pytest.raises(
        DataError,
        match=r"3 examples cannot fill 4 curriculum stages \(stage 3 would be empty\); use at most 3 stages",
    ):
        split_stages([1.0, 2.0, 3.0], 4)


@pytest.mark.parametrize(
    ("scores", "k", "kw", "err", "match"),
    [
        ([1.0, np.nan], 1, {}, DataError, "example 1 is nan"),
        ([[1.0]], 1, {}, ValueError, "1-D"),
        ([1.0], 0, {}, ValueError, "num_stages=0"),
        ([1.0], 1, {"mode": "hard"}, ValueError, "mode='hard'"),
    ],
)
def test_split_argument_errors(scores, k, kw, err, match):
    with pytest.raises(err, match=match):
        split_stages(scores, k, **kw)


# --- CurriculumSampler ---------------------------------------------------------------------------

STAGES = [np.arange(0, 10), np.arange(10, 17), np.arange(17, 30)]


def _run(sampler: CurriculumSampler, calls: list[tuple[int | None, float]]) -> list[np.ndarray]:
    return [sampler.next_batch(stage, replay) for stage, replay in calls]


CALLS = [(0, 0.0)] * 4 + [(1, 0.25)] * 5 + [(None, 0.0)] * 2 + [(2, 0.5)] * 6 + [(0, 0.0)] * 3


def test_sampler_deterministic_and_seed_dependent():
    a = _run(CurriculumSampler(STAGES, batch_size=4, seed=3), CALLS)
    b = _run(CurriculumSampler(STAGES, batch_size=4, seed=3), CALLS)
    c = _run(CurriculumSampler(STAGES, batch_size=4, seed=4), CALLS)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    assert all(x.dtype == np.int64 and x.shape == (4,) for x in a)


def test_sampler_stage_stream_is_epochwise_shuffle():
    sampler = CurriculumSampler(STAGES, batch_size=4, seed=0)
    drawn = np.concatenate([sampler.next_batch(1) for _ in range(7)])  # 28 = 4 epochs of 7
    epochs = drawn.reshape(4, 7)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(10, 17))  # each epoch covers the stage once
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled between epochs


def test_sampler_resume_mid_stream_gives_identical_continuation():
    full = CurriculumSampler(STAGES, batch_size=4, seed=5)
    head = _run(full, CALLS[:9])
    state = json.loads(json.dumps(full.state_dict()))  # must survive JSON
    tail = _run(full, CALLS[9:])

    resumed = CurriculumSampler(STAGES, batch_size=4, seed=5)
    resumed.load_state_dict(state)
    assert all(np.array_equal(x, y) for x, y in zip(tail, _run(resumed, CALLS[9:]), strict=True))

    # The saved state is mid-epoch (stage 0 was left at position 6 of 10).
    assert state["streams"]["stage/0"] == {"epoch": 1, "position": 6}
    assert head[0].shape == (4,)


def test_sampler_load_state_checks_seed_and_stages():
    state = CurriculumSampler(STAGES, batch_size=4, seed=5).state_dict()
    with pytest.raises(ValueError, match="seed 5"):
        CurriculumSampler(STAGES, batch_size=4, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="same data and curriculum"):
        CurriculumSampler([np.arange(30)], batch_size=4, seed=5).load_state_dict(state)
    moved = [np.arange(0, 10), np.arange(11, 18), np.arange(18, 31)]  # same sizes, other members
    with pytest.raises(ValueError, match="same data and curriculum"):
        CurriculumSampler(moved, batch_size=4, seed=5).load_state_dict(state)
    bad = {**state, "streams": {"stage/9": {"epoch": 0, "position": 0}}}
    with pytest.raises(ValueError, match="unknown stream 'stage/9'"):
        CurriculumSampler(STAGES, batch_size=4, seed=5).load_state_dict(bad)


@pytest.mark.parametrize(
    ("replay", "batch", "n_replay"),
    [(0.0, 8, 0), (0.25, 8, 2), (0.3, 8, 2), (0.3125, 8, 3), (0.5, 5, 3), (0.1, 4, 0), (0.9, 8, 7)],
)
def test_sampler_replay_share(replay, batch, n_replay):
    sampler = CurriculumSampler(STAGES, batch_size=batch, seed=0)
    for _ in range(10):
        got = sampler.next_batch(2, replay)
        assert got.shape == (batch,)
        from_stage = np.isin(got, STAGES[2])
        assert from_stage.sum() == batch - n_replay
        assert np.all(got[~from_stage] < 17)  # replay comes from stages 0 and 1
        assert np.all(from_stage[: batch - n_replay])  # current-stage indices first


def test_sampler_replay_pool_covers_all_earlier_stages():
    sampler = CurriculumSampler(STAGES, batch_size=10, seed=0)
    replayed = np.concatenate([sampler.next_batch(2, replay=0.5)[5:] for _ in range(34)])
    assert set(replayed.tolist()) == set(range(17))
    # Stage 0 has nothing earlier: replay is ignored there.
    assert np.isin(sampler.next_batch(0, replay=0.5), STAGES[0]).all()


def test_sampler_streams_are_independent():
    """Drawing from other stages (or all examples, or replay) never changes a stage's stream."""
    alone = CurriculumSampler(STAGES, batch_size=3, seed=9)
    only_stage1 = [alone.next_batch(1) for _ in range(6)]
    mixed = CurriculumSampler(STAGES, batch_size=3, seed=9)
    interleaved = []
    for _ in range(6):
        mixed.next_batch(0)
        mixed.next_batch(None)
        mixed.next_batch(2, replay=0.5)
        interleaved.append(mixed.next_batch(1))
    assert all(np.array_equal(x, y) for x, y in zip(only_stage1, interleaved, strict=True))


def test_sampler_all_examples_stream():
    sampler = CurriculumSampler(STAGES, batch_size=6, seed=0)
    drawn = np.concatenate([sampler.next_batch(None, replay=0.5) for _ in range(5)])
    assert sorted(drawn.tolist()) == list(range(30))  # one epoch over every example


def test_sampler_batch_larger_than_stage_wraps_epochs():
    sampler = CurriculumSampler([np.array([4, 5])], batch_size=5, seed=0)
    got = sampler.next_batch(0)
    assert sorted(got.tolist()) == [4, 4, 5, 5, 5] or sorted(got.tolist()) == [4, 4, 4, 5, 5]
    assert sampler.state_dict()["streams"]["stage/0"] == {"epoch": 2, "position": 1}


@pytest.mark.parametrize(
    ("stage", "replay", "match"),
    [(3, 0.0, "stage=3"), (-1, 0.0, "stage=-1"), (1, 1.0, "replay=1.0"), (1, -0.1, "replay=-0.1")],
)
def test_sampler_bad_calls(stage, replay, match):
    with pytest.raises(ValueError, match=match):
        CurriculumSampler(STAGES, batch_size=4, seed=0).next_batch(stage, replay)


def test_sampler_bad_construction():
    with pytest.raises(DataError, match="stage 1 is empty"):
        CurriculumSampler([np.arange(3), np.array([], dtype=int)], batch_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        CurriculumSampler(STAGES, batch_size=0, seed=0)
