"""Compact teacher targets (TeacherService in-process, no Ray) against dense references.

The reference runs the whole batch through the model once, takes the (B, T, V) logits sliced to
the tokenizer, and a numpy float64 log-softmax + top-k at the scored positions.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, logsumexp

from clpd_ray.config import TeacherSpec
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.distill.compact import TARGET_ITEMSIZE, encode_logprobs, transport_summary
from clpd_ray.distill.models import build_model
from clpd_ray.messages import Batch, TeacherTargets
from clpd_ray.runtime.actors.teacher import TeacherService

PAD_ROWS = 6  # embedding rows past the tokenizer, as Qwen checkpoints have


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    tok = build_char_tokenizer()
    spec = TeacherSpec(
        name="t", arch="qwen3", n_layer=1, n_embd=32, n_head=2, vocab_size=len(tok) + PAD_ROWS
    )
    path = tmp_path_factory.mktemp("teacher")
    model = build_model(spec, tok, seed=3)
    with torch.no_grad():  # padded rows that would win every top-k if they were not sliced off
        model.get_output_embeddings().weight[len(tok) :] *= 40.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_batch(n: int = 7, step: int = 0) -> Batch:
    tok = build_char_tokenizer()
    enc = encode_examples(tok, generate_examples(n, 3, step, "train"))
    return Batch(step, 0, enc.input_ids, enc.attention_mask, enc.loss_mask, np.arange(n))


def dense_reference(teacher: TeacherService, batch: Batch, k: int, temperature: float):
    with torch.no_grad():
        logits = teacher.model(
            input_ids=torch.as_tensor(batch.input_ids),
            attention_mask=torch.as_tensor(batch.attention_mask),
        ).logits[..., : teacher.vocab_size]
    logp = log_softmax(logits.double().numpy() / temperature, axis=-1)[batch.loss_mask]  # (N, V)
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    return np.take_along_axis(logp, ids, axis=-1), ids


@pytest.mark.parametrize("micro_batch", [1, 3, 16])
def test_compact_targets_equal_dense_at_scored_positions(teacher_dir, micro_batch):
    teacher = TeacherService(
        "t", 0, teacher_dir, top_k=5, temperature=1.5, micro_batch=micro_batch,
        target_dtype="float32",
    )  # fmt: skip
    assert teacher._head is not None  # the chunked path (body, then projection per chunk)
    batch = make_batch()
    out = teacher.targets(batch)
    ref_lp, ref_ids = dense_reference(teacher, batch, 5, 1.5)
    n = batch.num_target_tokens
    assert out.logprobs.shape == out.ids.shape == (n, 5)
    assert out.logprobs.dtype == np.float32 and out.ids.dtype == np.int32
    np.testing.assert_array_equal(out.ids, ref_ids)
    np.testing.assert_allclose(out.logprobs, ref_lp, rtol=1e-5, atol=1e-5)


def test_full_logits_fallback_gives_the_same_targets(teacher_dir):
    kw = {"top_k": 4, "micro_batch": 2, "target_dtype": "float32"}
    chunked = TeacherService("t", 0, teacher_dir, **kw)
    whole = TeacherService("t", 0, teacher_dir, **kw)
    whole._head = None  # as for a soft-capped model: model(...).logits per micro-batch
    batch = make_batch(5)
    a, b = chunked.targets(batch), whole.targets(batch)
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-6)


def test_padded_rows_are_never_targets(teacher_dir):
    # k = the tokenizer's size: every real id, and the probabilities sum to one over them alone.
    teacher = TeacherService("t", 0, teacher_dir, top_k=10_000, target_dtype="float32")
    v = teacher.vocab_size
    assert teacher.top_k == v
    assert teacher.model.get_output_embeddings().weight.shape[0] == v + PAD_ROWS
    out = teacher.targets(make_batch(3))
    assert out.ids.max() < v
    np.testing.assert_allclose(logsumexp(out.logprobs.astype(np.float64), axis=-1), 0.0, atol=1e-5)


@pytest.mark.parametrize("target_dtype", ["float16", "bfloat16"])
def test_narrow_target_dtypes_round_once(teacher_dir, target_dtype):
    wide = TeacherService("t", 0, teacher_dir, top_k=6, target_dtype="float32")
    narrow = TeacherService("t", 0, teacher_dir, top_k=6, target_dtype=target_dtype)
    batch = make_batch()
    a, b = wide.targets(batch), narrow.targets(batch)
    np.testing.assert_array_equal(a.ids, b.ids)
    expected = torch.tensor(a.logprobs).to(getattr(torch, target_dtype)).float().numpy()
    np.testing.assert_array_equal(b.logprobs_float32(), expected)  # exactly one rounding
    assert b.logprobs.itemsize == 2
    lp, ids = b.at_positions(batch.loss_mask)
    assert lp.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(lp, expected)


def test_encode_logprobs_keeps_float16_finite():
    lp = torch.tensor([[-0.1, -70000.0, -float("inf")]])
    out = encode_logprobs(lp, "float16")
    assert np.isfinite(out).all() and out[0, 1] == np.finfo(np.float16).min
    with pytest.raises(ValueError, match="target_dtype='int8'"):
        encode_logprobs(lp, "int8")


def test_bytes_sent_match_the_transport_formula(teacher_dir):
    teacher = TeacherService("t", 0, teacher_dir, top_k=8)  # default target dtype (float16)
    batches = [make_batch(6, step=s) for s in range(2)]
    sent = [teacher.targets(b) for b in batches]
    stats = teacher.stats()
    tokens = sum(b.num_target_tokens for b in batches)
    per_token = transport_summary(stats["logit_width"], 8, teacher.target_dtype)
    assert stats["tokens_sent"] == tokens
    assert stats["bytes_sent"] == sum(t.logprobs.nbytes + t.ids.nbytes for t in sent)
    assert stats["bytes_sent"] == tokens * per_token["bytes_per_token"]
    assert per_token["full_vocab_bytes_per_token"] == 4 * (teacher.vocab_size + PAD_ROWS)


def test_transport_summary_at_qwen_scale():
    t = transport_summary(151_936, 64, "float16")
    assert t == {
        "vocab_size": 151_936,
        "top_k": 64,
        "bytes_per_token": 64 * (TARGET_ITEMSIZE["float16"] + 4),
        "full_vocab_bytes_per_token": 151_936 * 4,
    }
    assert t["bytes_per_token"] <= 600  # the bound at k=64
    assert transport_summary(10, 3, "float32")["bytes_per_token"] == 3 * 8


def test_precomputed_targets_are_served_only_for_their_batch(teacher_dir, tmp_path):
    # Precompute fills the per-example target store (tests/test_target_store.py for more).
    teacher = TeacherService("t", 0, teacher_dir, top_k=4, target_store=str(tmp_path))
    batch, other = make_batch(4, step=5), make_batch(5, step=1)
    assert teacher.precompute(batch) == 4
    served = teacher.targets(batch)
    assert teacher.store().stats() == {"hits": 4, "misses": 0, "ahead": 4}
    same_step = Batch(5, 0, other.input_ids, other.attention_mask, other.loss_mask, np.arange(5))
    fresh = teacher.targets(same_step)  # same step and ids, other examples: recomputed
    assert teacher.store().stats()["misses"] == 5
    assert fresh.logprobs.shape[0] == other.num_target_tokens
    assert served.logprobs.shape[0] == batch.num_target_tokens


def test_dense_layout_is_still_read_and_mismatches_are_named():
    rng = np.random.default_rng(0)
    mask = rng.random((3, 4)) < 0.5
    assert 0 < mask.sum() < mask.size
    lp = rng.standard_normal((3, 4, 2)).astype(np.float32)
    ids = rng.integers(0, 9, size=(3, 4, 2))
    dense = TeacherTargets("t", 0, lp, ids, 1.0)
    got_lp, got_ids = dense.at_positions(mask)
    np.testing.assert_array_equal(got_lp, lp[mask])
    np.testing.assert_array_equal(got_ids, ids[mask])
    compact = TeacherTargets("t", 0, lp[mask], ids[mask].astype(np.int32), 1.0)
    np.testing.assert_array_equal(compact.at_positions(mask)[0], lp[mask])
    with pytest.raises(ValueError, match=r"teacher 't' sent targets of shape"):
        compact.at_positions(np.ones_like(mask))  # 12 scored positions, targets for fewer


def test_transport_entry_reads_the_widest_teacher(teacher_dir, tmp_path):
    from clpd_ray.config import load_config
    from clpd_ray.distill.compact import logit_width, transport_entry

    v = len(build_char_tokenizer())
    assert logit_width(teacher_dir) == v + PAD_ROWS
    assert logit_width(tmp_path / "missing") is None
    config = load_config(None, ["teachers.top_k=500", "teachers.target_dtype=bfloat16"])
    entry = transport_entry(config, v, [tmp_path / "missing", teacher_dir])
    assert entry == {"transport": transport_summary(v + PAD_ROWS, v, "bfloat16")}  # k capped
    assert (
        transport_entry(load_config(None, ["distill.objective=sequence"]), v, [teacher_dir]) == {}
    )


def test_bfloat16_teacher_weights_with_float32_topk(teacher_dir):
    wide = TeacherService("t", 0, teacher_dir, top_k=6, target_dtype="float32")
    bf16 = TeacherService("t", 0, teacher_dir, top_k=6, dtype="bfloat16", target_dtype="float32")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    batch = make_batch()
    a, b = wide.targets(batch), bf16.targets(batch)
    assert b.logprobs.dtype == np.float32 and np.isfinite(b.logprobs).all()
    # bf16 weights move the logits a little: same leading ids, log-probs within bf16 noise.
    assert (a.ids[:, 0] == b.ids[:, 0]).mean() > 0.9
    np.testing.assert_allclose(b.logprobs[:, 0], a.logprobs[:, 0], atol=0.1)
