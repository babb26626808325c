"""Tests for clpd_ray.distill.losses against an independent numpy/scipy float64 reference."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.special import log_softmax, rel_entr, softmax

from clpd_ray.config import DistillConfig
from clpd_ray.distill.losses import (
    hard_ce_loss,
    hard_ce_loss_flat,
    kd_loss,
    kd_loss_flat,
    sparse_kd_loss,
    sparse_kd_loss_flat,
    topk_targets,
)

KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
TAILS = ("renormalise", "zero", "tail_bucket")
MASKS = ("random", "empty", "all")
TAIL_FLOOR = float(np.finfo(np.float32).eps)


# ----------------------------------------------------------------------------------------------
# Independent reference (numpy float64, probability space)


def ref_divergence(p: np.ndarray, q: np.ndarray, kind: str, beta: float, alpha: float):
    """(..., S) probabilities -> (...) per-position values, straight from the conventions table."""
    if kind == "fkl":
        return rel_entr(p, q).sum(-1)
    if kind == "rkl":
        return rel_entr(q, p).sum(-1)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * rel_entr(p, m).sum(-1) + (1 - beta) * rel_entr(q, m).sum(-1)
    if kind == "skew_fkl":
        return rel_entr(p, alpha * p + (1 - alpha) * q).sum(-1)
    if kind == "skew_rkl":
        return rel_entr(q, alpha * q + (1 - alpha) * p).sum(-1)
    if kind == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    raise AssertionError(kind)


def ref_mean(per_position: np.ndarray, mask: np.ndarray) -> float:
    n = int(mask.sum())
    return float(per_position[mask].sum() / n) if n else 0.0


def ref_ce(student: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    logq = log_softmax(student.astype(np.float64), axis=-1)
    nll = -np.take_along_axis(logq, labels[..., None], axis=-1)[..., 0]
    return ref_mean(nll, mask)


def ref_kd(student, teacher, mask, kind, *, beta=0.5, alpha=0.1, temperature=1.0):
    p = softmax(teacher.astype(np.float64) / temperature, axis=-1)
    q = softmax(student.astype(np.float64) / temperature, axis=-1)
    return ref_mean(ref_divergence(p, q, kind, beta, alpha), mask)


def ref_sparse(student, lp, ids, mask, kind, tail, *, beta=0.5, alpha=0.1, temperature=1.0):
    lp = lp.astype(np.float64)
    q_full = softmax(student.astype(np.float64) / temperature, axis=-1)
    q_k = np.take_along_axis(q_full, ids, axis=-1)  # unrenormalised student mass at the ids
    p_k = np.exp(lp)
    if tail == "renormalise":
        p, q = p_k / p_k.sum(-1, keepdims=True), q_k / q_k.sum(-1, keepdims=True)
    elif tail == "zero":
        p, q = p_k / p_k.sum(-1, keepdims=True), q_k
    else:
        p_tail = np.maximum(1.0 - p_k.sum(-1, keepdims=True), TAIL_FLOOR)
        q_tail = np.maximum(1.0 - q_k.sum(-1, keepdims=True), TAIL_FLOOR)
        p = np.concatenate([p_k, p_tail], axis=-1)
        q = np.concatenate([q_k, q_tail], axis=-1)
    return ref_mean(ref_divergence(p, q, kind, beta, alpha), mask)


# ----------------------------------------------------------------------------------------------
# Random cases


def make_case(seed: int, mask_mode: str = "random", scale: float = 3.0, B=3, T=5, V=11):
    rng = np.random.default_rng(seed)
    student = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    teacher = (scale * rng.standard_normal((B, T, V))).astype(np.float32)
    if mask_mode == "random":
        mask = rng.random((B, T)) < 0.6
        mask[0, 0] = True  # at least one scored position
    else:
        mask = np.full((B, T), mask_mode == "all")
    labels = rng.integers(0, V, size=(B, T))
    return student, teacher, mask, labels


def ref_topk(teacher: np.ndarray, k: int, temperature: float):
    logp = log_softmax(teacher.astype(np.float64) / temperature, axis=-1)
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(logp, ids, axis=-1).astype(np.float32), ids


def run_loss(fn, student_np, *args, **kwargs):
    """Loss value and student gradient (both checked finite by callers)."""
    student = torch.tensor(student_np, requires_grad=True)
    loss = fn(student, *args, **kwargs)
    loss.backward()
    return loss, student.grad


# ----------------------------------------------------------------------------------------------
# Dense kd_loss against the reference


@pytest.mark.parametrize("mask_mode", MASKS)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_matches_reference(kind, temperature, seed, mask_mode):
    student, teacher, mask, _ = make_case(seed, mask_mode)
    kw = {"beta": 0.3, "alpha": 0.2, "temperature": temperature}
    loss, grad = run_loss(kd_loss, student, torch.tensor(teacher), torch.tensor(mask), kind, **kw)
    expected = ref_kd(student, teacher, mask, kind, **kw)
    torch.testing.assert_close(loss.item(), expected, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(grad).all()
    assert (grad[torch.tensor(~mask)] == 0).all()  # unscored positions get no gradient


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [50.0, 100.0])
@pytest.mark.parametrize("kind", KINDS)
def test_kd_loss_peaked_distributions(kind, scale, seed):
    # exp(-(differences of hundreds)) underflows float32: naive p * log(p / m) would give NaN.
    student, teacher, mask, _ = make_case(seed, "random", scale=scale)
    loss, grad = run_loss(kd_loss, student, torch.tensor(teacher), mask, kind, beta=0.5, alpha=0.1)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    expected = ref_kd(student, teacher, mask, kind, beta=0.5, alpha=0.1)
    torch.testing.assert_close(loss.item(), expected, rtol=1e-4, atol=1e-4)


def test_fkl_gradient_is_q_minus_p_over_t():
    # d/ds KL(p || softmax(s / T)) = (q - p) / T, averaged over the N scored positions.
    student, teacher, mask, _ = make_case(3)
    temperature = 1.7
    _, grad = run_loss(kd_loss, student, teacher, mask, "fkl", temperature=temperature)
    p = softmax(teacher.astype(np.float64) / temperature, axis=-1)
    q = softmax(student.astype(np.float64) / temperature, axis=-1)
    expected = np.where(mask[..., None], (q - p) / temperature / mask.sum(), 0.0)
    torch.testing.assert_close(grad.double(), torch.tensor(expected), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_flows_to_student_only(kind):
    student_np, teacher_np, mask, _ = make_case(4)
    student = torch.tensor(student_np, requires_grad=True)
    teacher = torch.tensor(teacher_np, requires_grad=True)
    kd_loss(student, teacher, mask, kind).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("kind", "student_too"),
    [(kind, False) for kind in KINDS if kind != "rkl"] + [(kind, True) for kind in KINDS],
)
def test_neg_inf_logits_stay_finite(kind, student_too):
    # Ids masked with -inf: p = 0 there, 0 log 0 = 0, no NaN in value or gradient. rkl is truly
    # infinite when only the teacher masks ids (q > 0 = p), so it runs only with both masked,
    # which also sends log m = logaddexp(-inf, -inf) through the mixtures.
    student, teacher, mask, _ = make_case(5)
    teacher[..., :3] = -np.inf
    if student_too:
        student[..., :3] = -np.inf
    loss, grad = run_loss(kd_loss, student, teacher, mask, kind)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    expected = ref_kd(student, teacher, mask, kind)
    torch.testing.assert_close(loss.item(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_empty_mask_is_zero_and_backward_works(kind):
    student_np, teacher, _, labels = make_case(6)
    empty = np.zeros(student_np.shape[:2], dtype=bool)
    for fn, args, kw in [
        (kd_loss, (teacher, empty, kind), {"ce_weight": 0.5, "labels": labels}),
        (sparse_kd_loss, (*topk_targets(teacher, 4), empty, kind), {"tail": "tail_bucket"}),
        (hard_ce_loss, (labels, empty), {}),
    ]:
        loss, grad = run_loss(fn, student_np, *args, **kw)
        assert loss.item() == 0.0 and loss.grad_fn is not None
        assert torch.equal(grad, torch.zeros_like(grad))


def test_jsd_half_is_symmetric():
    student, teacher, mask, _ = make_case(7)
    s, t = torch.tensor(student), torch.tensor(teacher)
    forward = kd_loss(s, t, mask, "jsd", beta=0.5)
    torch.testing.assert_close(forward, kd_loss(t, s, mask, "jsd", beta=0.5))
    assert 0.0 < forward.item() <= np.log(2.0)


@pytest.mark.parametrize(("skew", "plain"), [("skew_fkl", "fkl"), ("skew_rkl", "rkl")])
def test_skew_alpha_zero_is_plain_kl(skew, plain):
    student, teacher, mask, _ = make_case(8)
    s, t = torch.tensor(student), torch.tensor(teacher)
    torch.testing.assert_close(
        kd_loss(s, t, mask, skew, alpha=0.0, temperature=1.5),
        kd_loss(s, t, mask, plain, temperature=1.5),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_t2_scaling(kind):
    student, teacher, mask, _ = make_case(9)
    s, t = torch.tensor(student), torch.tensor(teacher)
    plain = kd_loss(s, t, mask, kind, temperature=2.5)
    scaled = kd_loss(s, t, mask, kind, temperature=2.5, scale_by_t2=True)
    torch.testing.assert_close(scaled, plain * 2.5**2)


def test_ce_term_matches_torch_cross_entropy():
    student, teacher, mask, labels = make_case(10)
    s, t, m = torch.tensor(student), torch.tensor(teacher), torch.tensor(mask)
    lab = torch.tensor(labels)
    reference_ce = F.cross_entropy(s[m], lab[m])
    ignored = torch.where(m, lab, torch.full_like(lab, -100))
    torch.testing.assert_close(
        F.cross_entropy(s.flatten(0, 1), ignored.flatten(), ignore_index=-100), reference_ce
    )
    torch.testing.assert_close(hard_ce_loss(s, lab, m), reference_ce)
    torch.testing.assert_close(hard_ce_loss(s, labels, mask).item(), ref_ce(student, labels, mask))
    # The CE term is at temperature 1 and is not scaled by T^2.
    kw = {"temperature": 2.0, "scale_by_t2": True}
    with_ce = kd_loss(s, t, m, "jsd", ce_weight=0.3, labels=lab, **kw)
    torch.testing.assert_close(with_ce, kd_loss(s, t, m, "jsd", **kw) + 0.3 * reference_ce)
    lp, ids = topk_targets(t, 5, temperature=2.0)
    sparse_ce = sparse_kd_loss(s, lp, ids, m, "fkl", ce_weight=0.3, labels=lab, **kw)
    torch.testing.assert_close(
        sparse_ce, sparse_kd_loss(s, lp, ids, m, "fkl", **kw) + 0.3 * reference_ce
    )


def test_sum_reduction_is_mean_times_count():
    student, teacher, mask, labels = make_case(11)
    s, t = torch.tensor(student), torch.tensor(teacher)
    kw = {"ce_weight": 0.2, "labels": labels}
    mean = kd_loss(s, t, mask, "rkl", **kw)
    torch.testing.assert_close(kd_loss(s, t, mask, "rkl", reduction="sum", **kw), mean * mask.sum())


def test_vocab_size_slices_both_and_mismatch_raises():
    rng = np.random.default_rng(12)
    student = torch.tensor(rng.standard_normal((2, 4, 9)), dtype=torch.float32)
    teacher = torch.tensor(rng.standard_normal((2, 4, 11)), dtype=torch.float32)
    mask = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"teacher vocabulary size 11 != student vocabulary size 9"
    ):
        kd_loss(student, teacher, mask)
    sliced = kd_loss(student, teacher, mask, "jsd", vocab_size=7)
    expected = ref_kd(student[..., :7].numpy(), teacher[..., :7].numpy(), mask.numpy(), "jsd")
    torch.testing.assert_close(sliced.item(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"vocab_size=10"):
        kd_loss(student, teacher, mask, vocab_size=10)


# ----------------------------------------------------------------------------------------------
# Sparse (top-k) targets


def test_topk_targets_match_reference():
    _, teacher, _, _ = make_case(13)
    lp, ids = topk_targets(teacher, 4, temperature=1.3)
    ref_lp, ref_ids = ref_topk(teacher, 4, 1.3)
    assert lp.dtype == torch.float32 and ids.dtype == torch.int64
    assert lp.shape == ids.shape == (3, 5, 4)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(lp.numpy(), ref_lp, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_matches_reference(kind, tail, temperature, seed):
    student, teacher, mask, _ = make_case(seed + 100)
    lp, ids = ref_topk(teacher, 4, temperature)  # numpy targets: independent of topk_targets
    kw = {"beta": 0.4, "alpha": 0.3, "temperature": temperature}
    loss, grad = run_loss(sparse_kd_loss, student, lp, ids, mask, kind, tail=tail, **kw)
    assert torch.isfinite(grad).all()
    expected = ref_sparse(student, lp, ids, mask, kind, tail, **kw)
    torch.testing.assert_close(loss.item(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_peaked_distributions(kind, tail):
    student, teacher, mask, _ = make_case(14, scale=80.0)
    lp, ids = ref_topk(teacher, 3, 1.0)
    loss, grad = run_loss(sparse_kd_loss, student, lp, ids, mask, kind, tail=tail)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    expected = ref_sparse(student, lp, ids, mask, kind, tail)
    torch.testing.assert_close(loss.item(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 3.0])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_sparse_with_full_vocab_equals_dense(kind, tail, temperature):
    student_np, teacher_np, mask, _ = make_case(15, V=7)
    student, teacher = torch.tensor(student_np), torch.tensor(teacher_np)
    lp, ids = topk_targets(teacher, 7, temperature=temperature)
    kw = {"beta": 0.3, "alpha": 0.2, "temperature": temperature}
    sparse = sparse_kd_loss(student, lp, ids, mask, kind, tail=tail, **kw)
    torch.testing.assert_close(sparse, kd_loss(student, teacher, mask, kind, **kw))


def test_sparse_zero_mode_semantics():
    # Teacher mass renormalised over the ids, student mass taken as is: fkl = KL(p || q/Z) - log Z.
    student, teacher, mask, _ = make_case(16)
    lp, ids = ref_topk(teacher, 3, 1.0)
    zero = sparse_kd_loss(torch.tensor(student), lp, ids, mask, "fkl", tail="zero")
    renorm = sparse_kd_loss(torch.tensor(student), lp, ids, mask, "fkl", tail="renormalise")
    q_k = np.take_along_axis(softmax(student.astype(np.float64), axis=-1), ids, axis=-1)
    log_z = np.log(q_k.sum(-1))
    torch.testing.assert_close(
        zero.item(), renorm.item() - ref_mean(log_z, mask), rtol=1e-5, atol=1e-6
    )
    assert zero.item() > renorm.item() >= 0.0


def test_sparse_accepts_numpy_and_torch_teacher():
    student, teacher, mask, _ = make_case(17)
    lp, ids = topk_targets(teacher, 5)  # numpy teacher logits in
    s = torch.tensor(student)
    from_torch = sparse_kd_loss(s, lp, ids, torch.tensor(mask), "jsd", tail="tail_bucket")
    from_numpy = sparse_kd_loss(s, lp.numpy(), ids.numpy(), mask, "jsd", tail="tail_bucket")
    torch.testing.assert_close(from_torch, from_numpy)


def test_sparse_teacher_gets_no_gradient():
    student_np, teacher_np, mask, _ = make_case(18)
    student = torch.tensor(student_np, requires_grad=True)
    lp, ids = ref_topk(teacher_np, 4, 1.0)
    lp_t = torch.tensor(lp, requires_grad=True)
    sparse_kd_loss(student, lp_t, torch.tensor(ids), mask, "rkl", tail="tail_bucket").backward()
    assert lp_t.grad is None and torch.isfinite(student.grad).all()


def test_sparse_ids_out_of_vocab_raise():
    student, teacher, mask, _ = make_case(19)
    lp, ids = ref_topk(teacher, 4, 1.0)
    with pytest.raises(ValueError, match=r"student vocabulary has 8 ids"):
        sparse_kd_loss(torch.tensor(student), lp, ids, np.ones_like(mask), vocab_size=8)


# ----------------------------------------------------------------------------------------------
# Flat forms: (N, ...) rows at the scored positions (compact targets, chunked student loss)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_flat_forms_match_reference(kind, tail, reduction):
    student, teacher, mask, labels = make_case(KINDS.index(kind) + 30)
    kw = {"beta": 0.4, "alpha": 0.3, "temperature": 1.5}
    lp, ids = ref_topk(teacher, 4, 1.5)
    n = int(mask.sum())
    scale = n if reduction == "sum" else 1
    s = torch.tensor(student[mask], requires_grad=True)  # (N, V)
    sparse = sparse_kd_loss_flat(s, lp[mask], ids[mask], kind, tail=tail, reduction=reduction, **kw)
    expected = ref_sparse(student, lp, ids, mask, kind, tail, **kw) * scale
    torch.testing.assert_close(sparse.item(), expected, rtol=1e-5, atol=1e-5)
    # Same value and gradient as the masked (B, T, V) form.
    s3 = torch.tensor(student, requires_grad=True)
    masked = sparse_kd_loss(s3, lp, ids, mask, kind, tail=tail, reduction=reduction, **kw)
    sparse.backward()
    masked.backward()
    torch.testing.assert_close(s.grad, s3.grad[torch.tensor(mask)])

    dense = kd_loss_flat(
        torch.tensor(student[mask]), teacher[mask], kind, reduction=reduction, **kw
    )
    torch.testing.assert_close(dense.item(), ref_kd(student, teacher, mask, kind, **kw) * scale)
    ce = hard_ce_loss_flat(torch.tensor(student[mask]), labels[mask], reduction=reduction)
    torch.testing.assert_close(ce.item(), ref_ce(student, labels, mask) * scale)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flat_sparse_widens_narrow_targets(dtype):
    student, teacher, mask, _ = make_case(40)
    lp, ids = ref_topk(teacher, 5, 1.0)
    narrow = torch.tensor(lp[mask]).to(dtype)  # what compact targets carry
    s = torch.tensor(student[mask])
    got = sparse_kd_loss_flat(s, narrow, ids[mask], "jsd", tail="tail_bucket")
    want = sparse_kd_loss_flat(s, narrow.float(), ids[mask], "jsd", tail="tail_bucket")
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float32


def test_flat_forms_check_shapes_and_t2():
    student, teacher, mask, labels = make_case(41)
    lp, ids = ref_topk(teacher, 4, 2.0)
    s = torch.tensor(student[mask])
    with pytest.raises(ValueError, match=r"flat losses take \(N, V\) rows"):
        sparse_kd_loss_flat(torch.tensor(student), lp, ids)
    with pytest.raises(ValueError, match=r"must both be \(N, K\)"):
        sparse_kd_loss_flat(s, lp[mask][:-1], ids[mask][:-1])
    with pytest.raises(ValueError, match=r"same N"):
        kd_loss_flat(s, teacher[mask][:-1])
    with pytest.raises(ValueError, match=r"labels has shape"):
        hard_ce_loss_flat(s, labels[mask][:-1])
    with pytest.raises(ValueError, match=r"tail='drop'"):
        sparse_kd_loss_flat(s, lp[mask], ids[mask], tail="drop")
    plain = sparse_kd_loss_flat(s, lp[mask], ids[mask], "rkl", temperature=2.0)
    scaled = sparse_kd_loss_flat(s, lp[mask], ids[mask], "rkl", temperature=2.0, scale_by_t2=True)
    torch.testing.assert_close(scaled, plain * 4.0)


def test_topk_targets_takes_flat_rows():
    _, teacher, mask, _ = make_case(42)
    lp, ids = topk_targets(teacher[mask], 4, temperature=0.8)  # (N, V) -> (N, 4)
    ref_lp, ref_ids = ref_topk(teacher[mask], 4, 0.8)
    np.testing.assert_array_equal(ids.numpy(), ref_ids)
    np.testing.assert_allclose(lp.numpy(), ref_lp, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Argument checks


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"kind": "kl"}, r"kind='kl'.*allowed: fkl, rkl, jsd"),
        ({"kind": "jsd", "beta": 0.0}, r"beta=0.0.*0 < beta < 1"),
        ({"kind": "jsd", "beta": 1.0}, r"beta=1.0"),
        ({"alpha": 1.0}, r"alpha=1.0.*0 <= alpha < 1"),
        ({"alpha": -0.1}, r"alpha=-0.1"),
        ({"temperature": 0.0}, r"temperature=0.0.*positive"),
        ({"temperature": float("nan")}, r"temperature=nan"),
        ({"ce_weight": 0.5}, r"labels=None"),
        ({"ce_weight": -1.0}, r"ce_weight=-1.0"),
        ({"reduction": "none"}, r"reduction='none'"),
    ],
)
def test_bad_arguments_raise(kwargs, pattern):
    student, teacher, mask, _ = make_case(20)
    s = torch.tensor(student)
    with pytest.raises(ValueError, match=pattern):
        kd_loss(s, teacher, mask, **kwargs)
    lp, ids = topk_targets(teacher, 3)
    with pytest.raises(ValueError, match=pattern):
        sparse_kd_loss(s, lp, ids, mask, **kwargs)


def test_bad_tail_shape_and_k_raise():
    student, teacher, mask, _ = make_case(21)
    s = torch.tensor(student)
    lp, ids = topk_targets(teacher, 3)
    with pytest.raises(ValueError, match=r"tail='drop'.*allowed: renormalise, zero, tail_bucket"):
        sparse_kd_loss(s, lp, ids, mask, tail="drop")
    with pytest.raises(ValueError, match=r"mask has shape \(3, 4\)"):
        kd_loss(s, teacher, mask[:, :4])
    with pytest.raises(ValueError, match=r"k=12 is out of range"):
        topk_targets(teacher, 12)


def test_defaults_match_config():
    # Each default lives in config.py; the signatures must not drift from it.
    config = DistillConfig()
    for fn in (kd_loss, sparse_kd_loss, kd_loss_flat, sparse_kd_loss_flat):
        params = inspect.signature(fn).parameters
        assert params["kind"].default == config.loss
        for name in ("beta", "alpha", "temperature", "scale_by_t2", "ce_weight"):
            if name in params:  # the flat forms leave the CE term to the caller
                assert params[name].default == getattr(config, name), (fn.__name__, name)
    for fn in (sparse_kd_loss, sparse_kd_loss_flat):
        assert inspect.signature(fn).parameters["tail"].default == config.tail
