"""Probes run on the student actor, on a device-local snapshot of its weights (no Ray here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpd_ray.data.batching import encode_examples
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.distill.compact import encode_logprobs
from clpd_ray.distill.losses import topk_targets
from clpd_ray.distill.probe import ProbeSet, run_probes, teacher_kl
from clpd_ray.messages import Batch, TeacherTargets


@pytest.fixture
def student(tmp_path, tiny_config):
    from clpd_ray.runtime.actors.student import StudentTrainer

    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    return StudentTrainer(tiny_config(), tmp_path / "tok", threads=1)


def _sets(n_stages: int = 2, size: int = 3):
    return [generate_examples(size, 3, seed=s, split="probe") for s in range(n_stages)]


def _batch(tok, examples, step: int = 0) -> Batch:
    e = encode_examples(tok, examples)
    return Batch(step, 0, e.input_ids, e.attention_mask, e.loss_mask, np.arange(len(examples)))


def test_a_probe_measures_the_weights_of_its_snapshot_not_later_ones(student):
    """snapshot() after step s, then more training: the probe still sees step s's weights."""
    sets = _sets()
    student.set_probes(sets, [], max_new_tokens=12)
    token = student.snapshot()
    before = {k: v.clone() for k, v in student.model.state_dict().items()}
    student.train_step(_batch(student.tokenizer, sets[0]))  # hard CE: weights move
    assert any(not torch.equal(v, student.model.state_dict()[k]) for k, v in before.items())
    got = student.probe(0, token)

    reference = student.model.__class__(student.model.config)
    reference.load_state_dict(before)
    probe_sets = [
        ProbeSet(s, tuple(ex), encode_examples(student.tokenizer, ex)) for s, ex in enumerate(sets)
    ]
    want = run_probes(reference, student.tokenizer, probe_sets, max_new_tokens=12)
    assert [p.stage for p in got] == [0, 1]
    assert [p.loss for p in got] == pytest.approx([p.loss for p in want], rel=1e-6)
    assert [p.accuracy for p in got] == [p.accuracy for p in want]
    assert student.model.training  # the live model is untouched by the probe


def test_snapshot_tokens_are_unique_so_a_replayed_step_gets_its_own(student):
    student.set_probes(_sets(1), [], max_new_tokens=4)
    a, b = student.snapshot(), student.snapshot()
    assert a != b
    student.probe(3, b)
    student.probe(3, a)  # each token is consumed once, in any order
    with pytest.raises(KeyError):
        student.probe(3, a)


def _dense_and_compact(logits: torch.Tensor, mask: torch.Tensor, k: int):
    logprobs, ids = topk_targets(logits, k, 1.0)  # (B, T, K)
    dense = TeacherTargets("t", 0, logprobs.numpy(), ids.numpy(), 1.0)
    compact = TeacherTargets("t", 0, logprobs[mask].half().numpy(), ids[mask].int().numpy(), 1.0)
    return dense, compact


def test_teacher_kl_is_the_same_for_dense_and_compact_targets():
    """KL(teacher || student) on the scored positions, whatever the target layout."""
    g = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.4
    dense, compact = _dense_and_compact(teacher, mask, k=11)
    # Independent reference: full-vocabulary KL(p || q) averaged over the scored positions.
    p, logq = teacher.log_softmax(-1).exp(), student.log_softmax(-1)
    per_pos = (p * (p.log() - logq)).sum(-1)
    want = float(per_pos[mask].mean())
    assert teacher_kl(student, mask, dense) == pytest.approx(want, rel=1e-5)
    assert teacher_kl(student, mask, compact) == pytest.approx(want, rel=2e-3)  # float16
    full = torch.as_tensor(dense.logprobs)[mask]
    bf16 = TeacherTargets("t", 0, encode_logprobs(full, "bfloat16"), compact.ids, 1.0)
    assert bf16.logprobs.dtype == np.uint16  # raw bits: read through at_positions, not as numbers
    assert teacher_kl(student, mask, bf16) == pytest.approx(want, rel=2e-2)
