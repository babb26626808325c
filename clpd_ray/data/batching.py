"""Turn examples into padded token batches with a loss mask.

Layout of one row (right-padded)::

    [prompt tokens][target tokens][eos][pad ... pad]
    loss_mask[t] is True where token t+1 is a target token or the eos:
    the logits at position t predict token t+1 (the shift convention of KD_CONVENTIONS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from clpd_ray.data.example import Example

__all__ = ["Encoded", "encode_examples", "encode_prompts"]


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    loss_mask: np.ndarray  # (B, T) bool, position t scores the prediction of token t+1


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int | None = None,
) -> Encoded:
    """Tokenize prompt + target + eos per example; truncate the target end at ``max_length``."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before encoding")
    prompts = _ids(tokenizer, [e.prompt for e in examples])
    targets = _ids(tokenizer, [e.target for e in examples])
    rows: list[tuple[list[int], int]] = []
    for p, t in zip(prompts, targets, strict=True):
        ids = [*p, *t, eos]
        if max_length is not None:
            ids = ids[:max_length]
        rows.append((ids, len(p)))
    width = max((len(ids) for ids, _ in rows), default=1)
    n = len(rows)
    input_ids = np.full((n, width), pad, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    loss_mask = np.zeros((n, width), dtype=bool)
    for i, (ids, plen) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        # Positions plen-1 .. len-2 predict the target tokens and the eos.
        loss_mask[i, max(plen - 1, 0) : len(ids) - 1] = True
    return Encoded(input_ids, attention, loss_mask)


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt ids and attention mask, ready for ``model.generate``."""
    ids = _ids(tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max((len(r) for r in ids), default=1)
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    attention = np.zeros((len(ids), width), dtype=np.int64)
    for i, r in enumerate(ids):
        if r:
            input_ids[i, width - len(r) :] = r
            attention[i, width - len(r) :] = 1
    return input_ids, attention
