"""Difficulty signals for curriculum ordering: pure functions, higher score = harder.

Static signals come from the chain of thought (CoT) alone: its step count (:func:`count_steps`,
:func:`step_scores`) or its token length (:func:`length_scores`). The dynamic signal is the
student's own mean negative log-likelihood of the reference target (:func:`student_loss_scores`),
to be recomputed at stage boundaries. :func:`rank_fusion` combines a static and a dynamic signal
on a common scale. Every scorer returns a float64 array of shape (N,), aligned with its input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata
from transformers import PreTrainedTokenizerBase

from clpd_ray.data.batching import encode_examples
from clpd_ray.data.example import Example
from clpd_ray.data.prompt_format import PromptFormat

__all__ = [
    "count_steps",
    "length_scores",
    "rank_fusion",
    "step_scores",
    "student_loss_scores",
]

StepMode = Literal["lines", "calc", "ops"]
_PLAIN = PromptFormat()

# The final answer line of a CoT: "#### 72" (GSM8K) or "#4" (embedded task).
_ANSWER_LINE_RE = re.compile(r"^\s*#+")
# One GSM8K calculator annotation, e.g. "<<16-3-4=9>>".
_CALC_RE = re.compile(r"<<[^<>]*>>")
# One binary arithmetic operator of an equation, e.g. SVAMP's "( 76.0 - 25.0 )" (a '-' counts
# only after an operand, so a sign is not an operation).
_OP_RE = re.compile(r"(?<=[\w)])\s*-|[+*/^]")


def count_steps(cot: str, mode: StepMode = "lines") -> int:
    """Reasoning steps in one chain of thought (at least 1).

    ``"lines"``: non-empty lines, not counting a final ``#...`` answer line.
    ``"calc"``: GSM8K calculator annotations ``<<expr=result>>``.
    ``"ops"``: binary arithmetic operators of an equation (SVAMP, MAWPS).
    """
    if mode == "lines":
        lines = [line for line in cot.splitlines() if line.strip()]
        if lines and _ANSWER_LINE_RE.match(lines[-1]):
            lines.pop()
        return max(1, len(lines))
    if mode == "calc":
        return max(1, len(_CALC_RE.findall(cot)))
    if mode == "ops":
        return max(1, len(_OP_RE.findall(cot)))
    raise ValueError(f"count_steps: mode={mode!r} is not one of 'lines', 'calc', 'ops'")


def step_scores(examples: Sequence[Example]) -> np.ndarray:
    """``Example.steps`` as scores, shape (N,); the step count was fixed when the example was made."""
    return np.array([e.steps for e in examples], dtype=np.float64)


def length_scores(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Token length of each target (CoT plus its answer line, no special tokens), shape (N,)."""
    if not examples:
        return np.zeros(0, dtype=np.float64)
    ids = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
    return np.array([len(row) for row in ids], dtype=np.float64)


def student_loss_scores(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    fmt: PromptFormat | None = None,
) -> np.ndarray:
    """Mean NLL (nats/token) of each target + eos given its prompt under ``model``, shape (N,).

    ``fmt``: the run's prompt format (plain by default; the chat template's end-of-turn marker
    then stands in for the eos).

    ``model`` is any Hugging Face causal LM already placed on ``device``. It is scored in eval mode
    (no dropout noise) and its train/eval mode is restored afterwards. Examples are batched in
    order of length to keep padding small; the result is in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"student_loss_scores: batch_size={batch_size} must be >= 1")
    n = len(examples)
    scores = np.zeros(n, dtype=np.float64)
    if n == 0:
        return scores
    # Character length is a cheap proxy for token length: it only affects padding, not results.
    order = np.argsort([len(e.prompt) + len(e.target) for e in examples], kind="stable")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                enc = encode_examples(tokenizer, [examples[i] for i in idx], fmt=fmt or _PLAIN)
                ids = torch.from_numpy(enc.input_ids).to(device)  # (B, T)
                attn = torch.from_numpy(enc.attention_mask).to(device)  # (B, T)
                mask = torch.from_numpy(enc.loss_mask[:, :-1]).to(device)  # (B, T-1)
                logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1]  # (B, T-1, V)
                nll = torch.nn.functional.cross_entropy(
                    logits.float().transpose(1, 2), ids[:, 1:], reduction="none"
                )  # (B, T-1): position t scores token t+1
                per_example = (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
                scores[idx] = per_example.double().cpu().numpy()
    finally:
        model.train(was_training)
    return scores


def _normalised_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (0 = lowest), ties sharing their average rank."""
    if x.size <= 1:
        return np.full(x.size, 0.5)
    return (rankdata(x, method="average") - 1.0) / (x.size - 1)


def rank_fusion(
    a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray, weight: float = 0.5
) -> np.ndarray:
    """``weight * rank(a) + (1 - weight) * rank(b)`` with ranks normalised to [0, 1], shape (N,).

    Ranks make signals on different scales (step counts, nats) comparable; tied scores share
    their average rank (``scipy.stats.rankdata(method="average")``).
    """
    xa = np.asarray(a, dtype=np.float64)
    xb = np.asarray(b, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != xb.shape:
        raise ValueError(
            f"rank_fusion: a and b must be 1-D arrays of equal length, got shapes {xa.shape} and {xb.shape}"
        )
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"rank_fusion: weight={weight} must be in [0, 1] (the share given to a)")
    if not (np.isfinite(xa).all() and np.isfinite(xb).all()):
        raise ValueError(
            "rank_fusion: scores contain NaN or inf; fix the scorer that produced them"
        )
    return weight * _normalised_ranks(xa) + (1.0 - weight) * _normalised_ranks(xb)
