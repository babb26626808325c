"""Chunked output projection: full-vocabulary logits exist for one chunk of positions at a time.

At V = 151,936 one position's float32 logits are 594 KiB, so a batch of 32 x 512 positions would
need ~9 GiB per copy. The student and the teachers therefore run the model body once, keep only
the final hidden states at the scored positions, and apply the output projection chunk by chunk:

    base(input_ids) -> hidden (B, T, H) -> [loss_mask] -> (N, H)
        chunk 0: head -> logits (c, V) -> loss sums (kd, ce) ─┐
        chunk 1: head -> logits (c, V) -> loss sums ───────────┼─> total (summed, not averaged)
        ...                                                     ┘

Each chunk runs under ``torch.utils.checkpoint``: its logits are freed after the forward and
recomputed in the backward, so the backward also holds one chunk's (c x V) tensors at a time.
Sums (not means) are returned so that callers divide by the global count of scored tokens (the
same update under gradient accumulation, docs/losses.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from clpd_ray.config import LossKind, TailMode
from clpd_ray.distill.losses import hard_ce_loss_flat, sparse_kd_loss_flat

__all__ = ["FlatTargets", "chunked_distill_loss", "chunked_sum", "output_head", "used_width"]

# Config attributes of models whose logits are not just head(hidden): soft-capping (Gemma 2/3),
# scaling (Cohere, Granite, Falcon-H1). Such models fall back to full logits per micro-batch.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "lm_head_multiplier",
)


def output_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """``(base, head)`` with ``model(x).logits == head(base(x).last_hidden_state)``, or None.

    None means the logits need more than the output projection (soft-capping, scaling, a model
    without a separable head): callers then take ``model(x).logits`` per micro-batch. The split
    is also checked numerically on a few tokens, so an unknown post-processing step is caught.
    """
    config: Any = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if any(getattr(text, name, None) is not None for name in _LOGIT_POSTPROCESSING):
        return None
    base = getattr(model, "base_model", None)
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if base is None or base is model or not isinstance(head, torch.nn.Linear):
        return None
    return (base, head) if _split_matches(model, base, head) else None


@torch.no_grad()
def _split_matches(model: torch.nn.Module, base: torch.nn.Module, head: torch.nn.Linear) -> bool:
    was_training = model.training
    model.eval()  # dropout off: both paths must see the same network
    try:
        device = head.weight.device
        n = min(8, int(head.weight.shape[0]))
        ids = torch.arange(n, device=device).unsqueeze(0)  # (1, n)
        attn = torch.ones_like(ids)
        full = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (1, n, V)
        hidden = base(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        split = head(hidden)  # (1, n, V)
        return full.shape == split.shape and torch.allclose(
            full.float(), split.float(), rtol=1e-4, atol=1e-5
        )
    finally:
        model.train(was_training)


def used_width(attention_mask: np.ndarray, loss_mask: np.ndarray) -> int:
    """Columns of a right-padded (b, T) micro-batch up to its last real or scored token.

    A causal model's outputs at earlier positions do not depend on later columns, so dropping
    columns that are padding in every row of the micro-batch changes nothing but the work done.
    """
    used = np.flatnonzero(np.asarray(attention_mask).any(0) | np.asarray(loss_mask).any(0))
    return int(used[-1]) + 1 if used.size else 1


def chunked_sum(
    rows: torch.Tensor, fn: Callable[[torch.Tensor, slice], torch.Tensor], chunk: int
) -> torch.Tensor:
    """``sum_i fn(rows[s_i], s_i)`` over consecutive slices ``s_i`` of at most ``chunk`` rows.

    ``fn`` maps a chunk of rows (and its slice, to index per-row targets) to a tensor, e.g. a
    loss sum. With autograd on, each chunk is checkpointed: only ``rows`` and ``fn``'s inputs are
    kept, and one chunk's intermediates are rebuilt at a time in the backward. ``fn`` must be
    deterministic (no dropout): the recomputation must give the same values. Zero rows: ``fn``
    is called once on the empty slice (losses give 0, still attached to the graph).
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: need at least one row per chunk (distill.loss_chunk)")
    n = rows.shape[0]
    grad = torch.is_grad_enabled() and rows.requires_grad
    total: torch.Tensor | None = None
    for start in range(0, max(n, 1), chunk):
        sl = slice(start, min(n, start + chunk))
        part = (
            checkpoint(fn, rows[sl], sl, use_reentrant=False, preserve_rng_state=False)
            if grad
            else fn(rows[sl], sl)
        )
        total = part if total is None else total + part
    assert total is not None
    return total


@dataclass(frozen=True)
class FlatTargets:
    """One teacher's compact targets as tensors: rows aligned with the student's scored rows."""

    logprobs: torch.Tensor  # (N, K), float32 / float16 / bfloat16
    ids: torch.Tensor  # (N, K) int64
    temperature: float
    weight: float = 1.0


def chunked_distill_loss(
    hidden: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor],
    targets: Sequence[FlatTargets],
    labels: torch.Tensor | None,
    *,
    vocab_size: int,
    chunk: int,
    kind: LossKind = "fkl",
    tail: TailMode = "renormalise",
    beta: float = 0.5,
    alpha: float = 0.1,
    scale_by_t2: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum) over N scored positions, the projection applied ``chunk`` rows at a time.

    ``hidden`` (N, H) are the student's final hidden states at the scored positions (or already
    its logits, with ``project`` the identity); ``project`` maps (c, H) -> (c, V_padded) logits,
    sliced here to ``vocab_size``. KD sum = sum over teachers of ``weight`` x
    ``sparse_kd_loss_flat(..., reduction="sum")``; CE sum = ``hard_ce_loss_flat(..., "sum")`` on
    ``labels`` (N,), or 0 when ``labels`` is None. Both are float32 scalars; divide by the global
    number of scored tokens for the mean.
    """

    def per_chunk(h: torch.Tensor, sl: slice) -> torch.Tensor:
        logits = project(h)[:, :vocab_size]  # (c, V)
        kd = torch.zeros((), device=logits.device, dtype=torch.float32)
        for t in targets:
            kd = kd + t.weight * sparse_kd_loss_flat(
                logits,
                t.logprobs[sl],
                t.ids[sl],
                kind,
                tail=tail,
                beta=beta,
                alpha=alpha,
                temperature=t.temperature,
                scale_by_t2=scale_by_t2,
                reduction="sum",
            )
        if labels is None:
            ce = torch.zeros((), device=logits.device, dtype=torch.float32)
        else:
            ce = hard_ce_loss_flat(logits, labels[sl], reduction="sum")
        return torch.stack([kd, ce])  # (2,)

    sums = chunked_sum(hidden, per_chunk, chunk)
    return sums[0], sums[1]
