"""Token-level distillation losses: pure functions of logits, masks and teacher targets.

Conventions follow ``docs/losses.md``: p is the teacher and q the student distribution at
one token position, both softmax(logits / T) computed in float32. Logits arrive already shifted
(position t predicts token t+1) and ``mask[b, t]`` says which positions are scored. The loss is the
mean over scored positions (or their sum, for callers that divide by a global token count under
gradient accumulation or data parallelism). The teacher is always detached.

    dense teacher   kd_loss(student (B,T,V), teacher (B,T,V), mask (B,T))
    top-k teacher   topk_targets(teacher (...,V), k) -> logprobs (...,K), ids (...,K)
                    sparse_kd_loss(student (B,T,V), logprobs, ids, mask, tail=...)
    flat forms      kd_loss_flat / sparse_kd_loss_flat / hard_ce_loss_flat on (N, ...) rows:
                    the scored positions only, already selected (compact teacher targets, the
                    chunked student loss in distill/chunked.py)

Both build per-position (p, q) log-probabilities over one support and hand them to
``_divergence``, so every formula lives in one place. Mixtures are built in log space and
0 log 0 = 0, so very peaked distributions give no NaN or inf.

Tail modes of ``sparse_kd_loss`` (teacher known only at its top-k ids, Z = student mass there):

- ``renormalise``: p and q both renormalised over the k ids; the divergence of those two
  k-point distributions. With k = V this is exactly the dense loss.
- ``zero``: p renormalised over the k ids (the teacher's tail is taken as zero); q is the
  student's full-vocabulary probability at the ids, not renormalised, so sum(q) = Z <= 1. The
  table's formulas are summed over the k ids only and the student's tail mass 1 - Z enters no
  term. For fkl and skew_fkl this is exact (their tail terms carry p = 0): fkl = KL(p || q / Z)
  - log Z >= 0, which also pushes student mass into the top-k. For rkl, skew_rkl, jsd and tvd the
  exact value would charge the tail (rkl would be infinite), so the tail terms are dropped:
  rkl >= Z log Z >= -1/e can be slightly negative, and tvd omits 0.5 (1 - Z).
- ``tail_bucket``: a (k+1)-th bucket holds 1 - sum of the k probabilities on each side (q
  unrenormalised, from the full log-softmax), computed as log(1 - exp(logsumexp)) and floored at
  float32 eps; a proper divergence between two (k+1)-point distributions. With k = V it equals the
  dense loss up to that floor.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

from clpd_ray.config import LossKind, TailMode

__all__ = [
    "hard_ce_loss",
    "hard_ce_loss_flat",
    "kd_loss",
    "kd_loss_flat",
    "sparse_kd_loss",
    "sparse_kd_loss_flat",
    "topk_targets",
]

Reduction = Literal["mean", "sum"]

_KINDS: tuple[str, ...] = get_args(LossKind)
_TAILS: tuple[str, ...] = get_args(TailMode)
_REDUCTIONS: tuple[str, ...] = get_args(Reduction)

# A float32 sum of k probabilities is only accurate to about eps, so a tail mass below it is
# rounding noise. Flooring both sides' tails there stops a noise tail on one side meeting an exact
# zero on the other (an infinite KL term).
_TAIL_FLOOR = float(torch.finfo(torch.float32).eps)
_LOG_ONE_MINUS_FLOOR = math.log1p(-_TAIL_FLOOR)


# ----------------------------------------------------------------------------------------------
# The formulas (one place)


def _kl_terms(loga: torch.Tensor, logb: torch.Tensor) -> torch.Tensor:
    """sum a (log a - log b) over the last dim, with 0 log 0 = 0.  (*, S) -> (*)."""
    a = loga.exp()
    # Double where: the masked-out branch gets a zero gradient instead of 0 * inf = NaN.
    diff = torch.where(a > 0, loga - logb, torch.zeros_like(loga))
    return (a * diff).sum(-1)


def _log_mix(logx: torch.Tensor, logy: torch.Tensor, w: float) -> torch.Tensor:
    """log(w x + (1 - w) y) from log x, log y, for 0 < w < 1, without leaving log space."""
    # logaddexp(-inf, -inf) has a NaN gradient; route those entries around it.
    both_zero = torch.isneginf(logx) & torch.isneginf(logy)
    safe_x = torch.where(both_zero, torch.zeros_like(logx), logx)
    safe_y = torch.where(both_zero, torch.zeros_like(logy), logy)
    mixed = torch.logaddexp(safe_x + math.log(w), safe_y + math.log1p(-w))
    return torch.where(both_zero, torch.full_like(mixed, -math.inf), mixed)


def _divergence(
    logp: torch.Tensor, logq: torch.Tensor, kind: str, beta: float, alpha: float
) -> torch.Tensor:
    """Per-position divergence between teacher p and student q given as log-probabilities.

    ``logp`` and ``logq`` are (*, S) over the same support (S = V, k or k + 1); returns (*), e.g.
    (B, T) or (N,). q need not sum to one (tail mode ``zero``); the formulas are the table's.
    """
    if kind == "fkl":
        return _kl_terms(logp, logq)
    if kind == "rkl":
        return _kl_terms(logq, logp)
    if kind == "jsd":
        logm = _log_mix(logp, logq, beta)  # m = beta p + (1 - beta) q
        return beta * _kl_terms(logp, logm) + (1.0 - beta) * _kl_terms(logq, logm)
    if kind == "skew_fkl":
        logm = logq if alpha == 0.0 else _log_mix(logp, logq, alpha)  # alpha p + (1 - alpha) q
        return _kl_terms(logp, logm)
    if kind == "skew_rkl":
        logm = logp if alpha == 0.0 else _log_mix(logq, logp, alpha)  # alpha q + (1 - alpha) p
        return _kl_terms(logq, logm)
    if kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise AssertionError(f"unvalidated kind {kind!r}")  # _check_params rejects it first


def _log_tail(log_mass: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x = log of the top-k mass, floored at log(_TAIL_FLOOR).  (*) -> (*)."""
    # Clamping x (not the result) keeps both branches finite, so no NaN gradient leaks.
    x = log_mass.clamp(max=_LOG_ONE_MINUS_FLOOR)
    near_one = x > -math.log(2.0)
    # log(-expm1(x)) is accurate for x near 0, log1p(-exp(x)) for x far below it.
    return torch.where(near_one, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


# ----------------------------------------------------------------------------------------------
# Argument checks (user mistakes name the value, the allowed range and the fix)


def _check_params(
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
    ce_weight: float,
    labels: object,
    reduction: str,
) -> None:
    if kind not in _KINDS:
        raise ValueError(
            f"kind={kind!r} is not a distillation loss; allowed: {', '.join(_KINDS)}. "
            "Fix: pass one of those (config key distill.loss)."
        )
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta={beta!r} is out of range; jsd needs 0 < beta < 1 (0.5 is the symmetric JSD). "
            "Fix: set distill.beta inside (0, 1)."
        )
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha={alpha!r} is out of range; skew KL needs 0 <= alpha < 1 (0 gives plain KL). "
            "Fix: set distill.alpha inside [0, 1)."
        )
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(
            f"temperature={temperature!r} is not a positive finite number. "
            "Fix: set distill.temperature > 0 (1.0 leaves the logits unchanged)."
        )
    if not (math.isfinite(ce_weight) and ce_weight >= 0.0):
        raise ValueError(
            f"ce_weight={ce_weight!r} must be a finite number >= 0. "
            "Fix: set distill.ce_weight to 0 (no hard-label term) or a positive weight."
        )
    if ce_weight > 0.0 and labels is None:
        raise ValueError(
            f"ce_weight={ce_weight!r} adds a hard cross-entropy term but labels=None. "
            "Fix: pass labels (B, T) int64 next-token ids, or set ce_weight=0."
        )
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not allowed; allowed: {', '.join(_REDUCTIONS)}. "
            "Fix: use 'mean', or 'sum' and divide by the global count of scored tokens."
        )


def _check_mask(student_logits: torch.Tensor, mask: object) -> torch.Tensor:
    """The (B, T) bool mask on the student's device, after checking shapes."""
    if student_logits.ndim != 3:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)}; expected (B, T, V). "
            "Fix: pass per-position logits with a batch and a time dimension."
        )
    mask_t = torch.as_tensor(mask, device=student_logits.device)
    if tuple(mask_t.shape) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"mask has shape {tuple(mask_t.shape)} but student_logits has (B, T) = "
            f"{tuple(student_logits.shape[:2])}. Fix: pass one bool per scored position."
        )
    return mask_t.bool()


def _slice_vocab(logits: torch.Tensor, vocab_size: int | None, what: str) -> torch.Tensor:
    if vocab_size is None:
        return logits
    if not 1 <= vocab_size <= logits.shape[-1]:
        raise ValueError(
            f"vocab_size={vocab_size} does not fit the {what} logits' vocabulary dimension "
            f"{logits.shape[-1]}. Fix: pass the tokenizer's real size, at most the logit width."
        )
    return logits[..., :vocab_size]


def _reduce(per_position: torch.Tensor, reduction: str) -> torch.Tensor:
    """(N,) values at scored positions -> scalar. Empty: 0, still attached to the graph."""
    total = per_position.sum()
    if reduction == "sum":
        return total
    return total / max(per_position.shape[0], 1)


def _ce(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    """Cross-entropy at temperature 1 of selected rows: logits (N, V), labels (N,)."""
    vocab = logits.shape[-1]
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        raise ValueError(
            f"labels at scored positions span [{int(labels.min())}, {int(labels.max())}] but the "
            f"vocabulary has {vocab} ids. Fix: mask out padding/ignored positions, or check the "
            "tokenizer and vocab_size."
        )
    per_position = F.cross_entropy(logits.float(), labels, reduction="none")  # (N,)
    return _reduce(per_position, reduction)


def _labels_at(labels: object, mask: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    labels_t = torch.as_tensor(labels, device=student_logits.device)
    if tuple(labels_t.shape) != tuple(mask.shape):
        raise ValueError(
            f"labels has shape {tuple(labels_t.shape)}; expected (B, T) = {tuple(mask.shape)}. "
            "Fix: pass the next-token id for every position (ignored where mask is False)."
        )
    return labels_t.long()[mask]  # (N,)


def _check_rows(student_logits: torch.Tensor) -> None:
    if student_logits.ndim != 2:
        raise ValueError(
            f"student_logits has shape {tuple(student_logits.shape)}; the flat losses take (N, V) "
            "rows, one per scored position. Fix: select the scored positions first "
            "(logits[mask]), or use the (B, T, V) form with a mask."
        )


def _dense_per_position(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Dense divergence per row: student, teacher (N, V) logits -> (N,)."""
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"teacher vocabulary size {teacher.shape[-1]} != student vocabulary size "
            f"{student.shape[-1]}. Fix: if the tokenizers' token-to-id maps agree (padded "
            "embeddings), pass vocab_size=<tokenizer size>; otherwise use sequence-level KD."
        )
    s = student.float() / temperature  # (N, V)
    t = teacher.float() / temperature  # (N, V)
    return _divergence(F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1), kind, beta, alpha)


def _sparse_per_position(
    student: torch.Tensor,
    lp: torch.Tensor,
    ids: torch.Tensor,
    kind: str,
    tail: str,
    beta: float,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """Top-k divergence per row: student (N, V) logits, teacher lp/ids (N, K) -> (N,)."""
    vocab = student.shape[-1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"teacher ids span [{int(ids.min())}, {int(ids.max())}] but the student vocabulary "
            f"has {vocab} ids. Fix: check the tokenizers match, or pass vocab_size."
        )
    lp = lp.float()  # (N, K); float16/bfloat16 targets are widened here
    if tail == "renormalise":
        # Only the k gathered logits matter: no (N, V) float32 copy of the student's logits.
        z = student.gather(-1, ids).float() / temperature  # (N, K)
        logp = lp - lp.logsumexp(-1, keepdim=True)  # (N, K)
        logq = F.log_softmax(z, dim=-1)  # (N, K)
    else:
        s = student.float()  # (N, V); a copy only if the logits are not float32 already
        if temperature != 1.0:
            s = s / temperature
        z = s.gather(-1, ids)  # (N, K) student logits at the teacher's ids
        logq_k = z - s.logsumexp(-1, keepdim=True)  # (N, K) full-vocabulary log-softmax at ids
        if tail == "zero":
            logp = lp - lp.logsumexp(-1, keepdim=True)  # (N, K)
            logq = logq_k  # sums to Z <= 1; see the module docstring
        else:  # tail_bucket
            logp_tail = _log_tail(lp.logsumexp(-1, keepdim=True))  # (N, 1)
            logq_tail = _log_tail(logq_k.logsumexp(-1, keepdim=True))  # (N, 1)
            logp = torch.cat([lp, logp_tail], dim=-1)  # (N, K + 1)
            logq = torch.cat([logq_k, logq_tail], dim=-1)  # (N, K + 1)
    return _divergence(logp, logq, kind, beta, alpha)


def _check_tail(tail: str) -> None:
    if tail not in _TAILS:
        raise ValueError(
            f"tail={tail!r} is not a tail mode; allowed: {', '.join(_TAILS)}. "
            "Fix: pass one of those (config key distill.tail)."
        )


def _teacher_topk(
    teacher_logprobs: torch.Tensor | np.ndarray,
    teacher_ids: torch.Tensor | np.ndarray,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    lp = torch.as_tensor(teacher_logprobs, device=device).detach()
    ids = torch.as_tensor(teacher_ids, device=device).long()
    return lp, ids


# ----------------------------------------------------------------------------------------------
# Public losses


def hard_ce_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Cross-entropy of the student on next-token ``labels`` (B, T), over masked positions.

    Computed in float32 at temperature 1. An empty mask gives 0 (backward still works).
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(_REDUCTIONS)}.")
    mask_t = _check_mask(student_logits, mask)
    labels_sel = _labels_at(labels, mask_t, student_logits)  # (N,)
    return _ce(student_logits[mask_t], labels_sel, reduction)  # logits (N, V)


def hard_ce_loss_flat(
    student_logits: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    *,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`hard_ce_loss` on rows already selected: logits (N, V), labels (N,) next-token ids."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}; allowed: {', '.join(_REDUCTIONS)}.")
    _check_rows(student_logits)
    labels_t = torch.as_tensor(labels, device=student_logits.device).long()
    if tuple(labels_t.shape) != tuple(student_logits.shape[:1]):
        raise ValueError(
            f"labels has shape {tuple(labels_t.shape)}; expected (N,) = "
            f"{tuple(student_logits.shape[:1])}, one next-token id per row. Fix: select labels "
            "with the same mask as the logits."
        )
    return _ce(student_logits, labels_t, reduction)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    kind: LossKind = "fkl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    ce_weight: float = 0.0,
    labels: torch.Tensor | np.ndarray | None = None,
    vocab_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Distillation loss from full teacher logits.

    ``student_logits`` and ``teacher_logits`` are (B, T, V), aligned per position; ``mask`` (B, T)
    bool marks scored positions. ``kind`` picks the divergence of ``docs/losses.md`` (beta for
    jsd, alpha for the skew KLs). The KD term is multiplied by T^2 only if ``scale_by_t2``. With
    ``ce_weight > 0``, ``ce_weight`` times the cross-entropy (at T = 1) on ``labels`` (B, T) is
    added. ``vocab_size`` slices both logits to ``[..., :vocab_size]`` (padded embeddings); a
    vocabulary mismatch without it is an error. Returns the mean over scored positions (0 if none)
    or, with ``reduction="sum"``, their sum.
    """
    _check_params(kind, beta, alpha, temperature, ce_weight, labels, reduction)
    mask_t = _check_mask(student_logits, mask)
    teacher = torch.as_tensor(teacher_logits, device=student_logits.device).detach()
    if teacher.ndim != 3 or tuple(teacher.shape[:2]) != tuple(student_logits.shape[:2]):
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; (B, T) must match. Fix: align the two batches."
        )
    student = _slice_vocab(student_logits, vocab_size, "student")
    teacher = _slice_vocab(teacher, vocab_size, "teacher")
    per_position = _dense_per_position(
        student[mask_t], teacher[mask_t], kind, beta, alpha, temperature
    )  # (N,), only scored positions
    loss = _reduce(per_position, reduction)
    if scale_by_t2:
        loss = loss * temperature**2
    if ce_weight > 0.0:
        labels_sel = _labels_at(labels, mask_t, student_logits)  # (N,)
        loss = loss + ce_weight * _ce(student[mask_t], labels_sel, reduction)
    return loss


def kd_loss_flat(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | np.ndarray,
    kind: LossKind = "fkl",
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    vocab_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`kd_loss` on rows already selected: student and teacher logits (N, V), one row per
    scored position. No CE term: add :func:`hard_ce_loss_flat` (the caller owns the weighting)."""
    _check_params(kind, beta, alpha, temperature, 0.0, None, reduction)
    _check_rows(student_logits)
    teacher = torch.as_tensor(teacher_logits, device=student_logits.device).detach()
    if teacher.ndim != 2 or teacher.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_logits has shape {tuple(teacher.shape)} but student_logits has "
            f"{tuple(student_logits.shape)}; both must be (N, V) with the same N. Fix: select "
            "both with the same mask."
        )
    student = _slice_vocab(student_logits, vocab_size, "student")
    teacher = _slice_vocab(teacher, vocab_size, "teacher")
    loss = _reduce(_dense_per_position(student, teacher, kind, beta, alpha, temperature), reduction)
    return loss * temperature**2 if scale_by_t2 else loss


def topk_targets(
    teacher_logits: torch.Tensor | np.ndarray, k: int, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher targets: log_softmax(logits / T) in float32, then its k largest entries.

    ``teacher_logits`` (..., V), e.g. (B, T, V) or (N, V) -> (logprobs float32 (..., k), ids
    int64 (..., k)), sorted by decreasing log-probability, detached. Pass ``temperature`` on to
    ``sparse_kd_loss``. The full log-softmax is never stored: the top-k of logits / T minus its
    logsumexp gives the same values without a second (..., V) float32 tensor.
    """
    if not (math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(
            f"temperature={temperature!r} is not a positive finite number. "
            "Fix: pass temperature > 0 (1.0 leaves the logits unchanged)."
        )
    logits = torch.as_tensor(teacher_logits).detach()
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(
            f"k={k} is out of range for a vocabulary of {vocab}. Fix: pass 1 <= k <= {vocab}."
        )
    z = logits.float()  # (..., V); a copy only if the logits are not float32 already
    if temperature != 1.0:
        z = z / temperature
    log_z = z.logsumexp(-1, keepdim=True)  # (..., 1)
    values, ids = z.topk(k, dim=-1)  # (..., k) each; log_softmax is monotone in z
    return values - log_z, ids.long()


def sparse_kd_loss(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor | np.ndarray,
    teacher_ids: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    kind: LossKind = "fkl",
    *,
    tail: TailMode = "renormalise",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    ce_weight: float = 0.0,
    labels: torch.Tensor | np.ndarray | None = None,
    vocab_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Distillation loss from top-k teacher targets (see the module docstring for ``tail``).

    ``teacher_logprobs`` (B, T, K) are the teacher's log-softmax values at ``temperature`` and
    ``teacher_ids`` (B, T, K) their distinct vocabulary ids (numpy or torch). ``student_logits``
    (B, T, V) are divided by the same temperature. Other arguments as in :func:`kd_loss`;
    ``vocab_size`` slices the student logits (the ids must lie below it).
    """
    _check_params(kind, beta, alpha, temperature, ce_weight, labels, reduction)
    _check_tail(tail)
    mask_t = _check_mask(student_logits, mask)
    lp, ids = _teacher_topk(teacher_logprobs, teacher_ids, student_logits.device)
    if lp.shape != ids.shape or lp.ndim != 3 or tuple(lp.shape[:2]) != tuple(mask_t.shape):
        raise ValueError(
            f"teacher_logprobs {tuple(lp.shape)} and teacher_ids {tuple(ids.shape)} must both be "
            f"(B, T, K) with (B, T) = {tuple(mask_t.shape)}. Fix: pass topk_targets' outputs."
        )
    student = _slice_vocab(student_logits, vocab_size, "student")
    per_position = _sparse_per_position(
        student[mask_t], lp[mask_t], ids[mask_t], kind, tail, beta, alpha, temperature
    )  # (N,)
    loss = _reduce(per_position, reduction)
    if scale_by_t2:
        loss = loss * temperature**2
    if ce_weight > 0.0:
        labels_sel = _labels_at(labels, mask_t, student_logits)  # (N,)
        loss = loss + ce_weight * _ce(student[mask_t], labels_sel, reduction)
    return loss


def sparse_kd_loss_flat(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor | np.ndarray,
    teacher_ids: torch.Tensor | np.ndarray,
    kind: LossKind = "fkl",
    *,
    tail: TailMode = "renormalise",
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    scale_by_t2: bool = False,
    vocab_size: int | None = None,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """:func:`sparse_kd_loss` on rows already selected: student logits (N, V), teacher
    log-probabilities (N, K) (float32, float16 or bfloat16; widened to float32) and ids (N, K),
    one row per scored position, as compact teacher targets arrive. No CE term: add
    :func:`hard_ce_loss_flat` (the caller owns the weighting)."""
    _check_params(kind, beta, alpha, temperature, 0.0, None, reduction)
    _check_tail(tail)
    _check_rows(student_logits)
    lp, ids = _teacher_topk(teacher_logprobs, teacher_ids, student_logits.device)
    if lp.shape != ids.shape or lp.ndim != 2 or lp.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_logprobs {tuple(lp.shape)} and teacher_ids {tuple(ids.shape)} must both be "
            f"(N, K) with N = {student_logits.shape[0]} rows of student_logits. Fix: pass compact "
            "targets for exactly the selected positions."
        )
    student = _slice_vocab(student_logits, vocab_size, "student")
    per_position = _sparse_per_position(student, lp, ids, kind, tail, beta, alpha, temperature)
    loss = _reduce(per_position, reduction)
    return loss * temperature**2 if scale_by_t2 else loss
