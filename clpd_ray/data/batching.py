"""Turn examples into padded token batches with a loss mask.

Layout of one row (right-padded)::

    [prompt tokens][target tokens][end][pad ... pad]
    loss_mask[t] is True where token t+1 is a target token or the end token:
    the logits at position t predict token t+1 (the shift convention of docs/losses.md).

The end token is the eos in plain format and the chat template's end-of-turn marker (e.g.
``<|im_end|>``) in chat format (:mod:`clpd_ray.data.prompt_format`). Prompt and target are
tokenized together as one text, so the tokens at the boundary are the ones the tokenizer makes
for the whole text; a token that straddles the boundary counts as a target token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from clpd_ray.data.example import Example
from clpd_ray.data.prompt_format import PromptFormat

__all__ = [
    "Encoded",
    "FitStats",
    "encode_examples",
    "encode_prompts",
    "fit_examples",
    "pad_id",
    "pad_rows",
    "tokenize_rows",
]

Overlong = Literal["truncate", "drop"]
_PLAIN = PromptFormat()


@dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64
    loss_mask: np.ndarray  # (B, T) bool, position t scores the prediction of token t+1
    # Indices (into the examples given) of the rows encoded; only overlong="drop" leaves some out.
    kept: np.ndarray | None = None


@dataclass(frozen=True)
class _Row:
    ids: list[int]  # prompt + target (+ end) token ids
    n_prompt: int  # leading prompt tokens
    prefix_chars: int  # len(prompt text)
    offsets: list[tuple[int, int]] | None  # char span of each token in the full text
    text: str  # the full text (without a plain-format eos)


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _rows(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], fmt: PromptFormat
) -> list[_Row]:
    if not examples:
        return []
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before encoding")
    prefixes = [fmt.prompt_text(tokenizer, e.prompt) for e in examples]
    end = fmt.end_text(tokenizer)
    texts = [p + e.target + end for p, e in zip(prefixes, examples, strict=True)]
    offsets: list[list[tuple[int, int]]] | None
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):  # slow tokenizers: no offsets
        enc = tokenizer(texts, add_special_tokens=False)
        offsets = None
    prefix_ids = _ids(tokenizer, prefixes) if offsets is None else None
    rows = []
    for i, (ids, prefix, text) in enumerate(zip(enc["input_ids"], prefixes, texts, strict=True)):
        ids = [int(t) for t in ids]
        if offsets is not None:
            # The leading tokens that end inside the prompt text.
            n_prompt = next(
                (j for j, (_, stop) in enumerate(offsets[i]) if stop > len(prefix)),
                len(offsets[i]),
            )
        else:
            assert prefix_ids is not None
            n_prompt = min(len(prefix_ids[i]), len(ids))
        if not end:
            ids.append(int(eos))
        rows.append(_Row(ids, n_prompt, len(prefix), None if offsets is None else offsets[i], text))
    return rows


def tokenize_rows(
    tokenizer: PreTrainedTokenizerBase, examples: Sequence[Example], fmt: PromptFormat = _PLAIN
) -> list[tuple[list[int], int]]:
    """(token ids incl. the end token, number of prompt tokens) of each example, unpadded."""
    return [(r.ids, r.n_prompt) for r in _rows(tokenizer, examples, fmt)]


def encode_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int | None = None,
    fmt: PromptFormat = _PLAIN,
    overlong: Overlong = "truncate",
) -> Encoded:
    """Tokenize prompt + target + end per example (together, see the module docstring).

    Rows longer than ``max_length`` lose their end (``overlong="truncate"``) or are left out
    (``"drop"``; ``Encoded.kept`` lists the rows kept).
    """
    if overlong not in ("truncate", "drop"):
        raise ValueError(f"overlong={overlong!r} is not one of 'truncate', 'drop'")
    pad = pad_id(tokenizer)
    rows: list[tuple[list[int], int]] = []
    kept: list[int] = []
    for i, row in enumerate(_rows(tokenizer, examples, fmt)):
        ids = row.ids
        if max_length is not None and len(ids) > max_length:
            if overlong == "drop":
                continue
            ids = ids[:max_length]
        rows.append((ids, row.n_prompt))
        kept.append(i)
    return pad_rows(rows, pad, np.asarray(kept, dtype=np.int64))


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id rows are padded with: the pad token, else the end token (which must exist)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token before encoding")
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)


def pad_rows(rows: Sequence[tuple[list[int], int]], pad: int, kept: np.ndarray) -> Encoded:
    """Right-padded ids, attention and loss mask of (ids, n_prompt) rows (tokenize_rows')."""
    width = max((len(ids) for ids, _ in rows), default=1)
    n = len(rows)
    input_ids = np.full((n, width), pad, dtype=np.int64)
    attention = np.zeros((n, width), dtype=np.int64)
    loss_mask = np.zeros((n, width), dtype=bool)
    for i, (ids, plen) in enumerate(rows):
        input_ids[i, : len(ids)] = ids
        attention[i, : len(ids)] = 1
        # Positions plen-1 .. len-2 predict the target tokens and the end token.
        loss_mask[i, max(plen - 1, 0) : len(ids) - 1] = True
    return Encoded(input_ids, attention, loss_mask, kept)


@dataclass(frozen=True)
class FitStats:
    """What :func:`fit_examples` did to a list of examples."""

    truncated: int = 0  # targets cut short to fit
    dropped: int = 0  # left out (overlong="drop", or a prompt that alone does not fit)
    longest: int | None = None  # tokens of the longest example before fitting (None: no limit)


def fit_examples(
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: int | None,
    fmt: PromptFormat = _PLAIN,
    overlong: Overlong = "truncate",
) -> tuple[list[Example], FitStats]:
    """The examples whose encoded rows fit ``max_length`` tokens, and what it took.

    ``"truncate"`` cuts the target text at a token boundary so that prompt + target + end fit
    (the end token is kept, so the row stays a complete turn); ``"drop"`` leaves the example out.
    An example whose prompt and end token alone do not fit is dropped either way.
    """
    if max_length is None:
        return list(examples), FitStats()  # nothing to fit: not even tokenized
    rows = _rows(tokenizer, examples, fmt)
    longest = max((len(r.ids) for r in rows), default=0)
    out: list[Example] = []
    truncated = dropped = 0
    end = fmt.end_text(tokenizer)
    n_end = len(_ids(tokenizer, [end])[0]) if end else 1  # the end marker, or the eos
    for e, row in zip(examples, rows, strict=True):
        if len(row.ids) <= max_length:
            out.append(e)
            continue
        keep = max_length - n_end - row.n_prompt  # target tokens that fit
        if overlong == "drop" or keep < 1:
            dropped += 1
            continue
        cut = _cut(tokenizer, e, row, end, keep, max_length)
        if cut is None:
            dropped += 1
        else:
            out.append(cut)
            truncated += 1
    return out, FitStats(truncated=truncated, dropped=dropped, longest=longest)


def _cut(
    tokenizer: PreTrainedTokenizerBase,
    e: Example,
    row: _Row,
    end: str,
    keep: int,
    max_length: int,
) -> Example | None:
    """``e`` with its target cut to about ``keep`` tokens, re-checked until it fits."""
    prefix = row.text[: row.prefix_chars]
    extra = 0 if end else 1  # the eos id appended in plain format
    while keep >= 1:
        last = row.n_prompt + keep - 1  # index of the last target token kept
        if row.offsets is not None:
            target = e.target[: max(row.offsets[last][1] - row.prefix_chars, 0)]
        else:
            target = str(tokenizer.decode(row.ids[row.n_prompt : last + 1]))
        if target and len(_ids(tokenizer, [prefix + target + end])[0]) + extra <= max_length:
            return replace(e, target=target)
        keep -= 1
    return None


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], fmt: PromptFormat = _PLAIN
) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ids and attention mask of each prompt's ``fmt.prompt_text``, for ``generate``."""
    ids = _ids(tokenizer, [fmt.prompt_text(tokenizer, p) for p in prompts])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max((len(r) for r in ids), default=1)
    input_ids = np.full((len(ids), width), pad, dtype=np.int64)
    attention = np.zeros((len(ids), width), dtype=np.int64)
    for i, r in enumerate(ids):
        if r:
            input_ids[i, width - len(r) :] = r
            attention[i, width - len(r) :] = 1
    return input_ids, attention
