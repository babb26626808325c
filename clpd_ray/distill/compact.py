"""Compact teacher targets: top-k log-probabilities in a narrow float, at scored positions only.

A teacher sends, per distilled token, k log-probabilities in ``teachers.target_dtype`` and k int32
ids (messages.TeacherTargets); the full-vocabulary alternative is V float32 logits:

    bytes_per_token            = k * (itemsize(target_dtype) + 4)      k=64, float16: 384 B
    full_vocab_bytes_per_token = V * 4                                 V=151,936: 607,744 B

``encode_logprobs`` turns the float32 top-k values into what crosses the object store;
``TeacherTargets.logprobs_float32`` reads them back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from clpd_ray.config import Config

__all__ = [
    "TARGET_ITEMSIZE",
    "encode_logprobs",
    "logit_width",
    "transport_entry",
    "transport_summary",
]

# Bytes per stored log-probability for each teachers.target_dtype.
TARGET_ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
_ID_BYTES = 4  # ids are int32: Qwen's 151,936 rows need more than int16


def encode_logprobs(logprobs: torch.Tensor, target_dtype: str) -> np.ndarray:
    """float32 log-probabilities (any shape) -> numpy in ``target_dtype`` on the host.

    float16 is clamped at its lowest finite value (-65504: probability 0 in float32 anyway), so a
    very unlikely id never arrives as -inf. bfloat16 has float32's range and is returned as its raw
    bits in a uint16 array (numpy has no bfloat16; ``TeacherTargets.logprobs_float32`` decodes it).
    """
    if target_dtype not in TARGET_ITEMSIZE:
        raise ValueError(
            f"target_dtype={target_dtype!r}; allowed: {', '.join(TARGET_ITEMSIZE)} "
            "(config key teachers.target_dtype)"
        )
    lp = logprobs.detach().float()
    if target_dtype == "float32":
        return lp.cpu().numpy()
    if target_dtype == "float16":
        low = torch.finfo(torch.float16).min
        return lp.clamp(min=low).to(torch.float16).cpu().numpy()
    bits = lp.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return bits.view(np.uint16)


def transport_summary(vocab_size: int, top_k: int, target_dtype: str) -> dict[str, int]:
    """The ``transport`` entry of summary.json: what one distilled token costs on the wire.

    ``vocab_size`` is the teachers' logit width (padded embedding rows included: what a
    full-vocabulary float32 hand-off would send), ``top_k`` the k actually sent.
    """
    if target_dtype not in TARGET_ITEMSIZE:
        raise ValueError(f"target_dtype={target_dtype!r}; allowed: {', '.join(TARGET_ITEMSIZE)}")
    return {
        "vocab_size": int(vocab_size),
        "top_k": int(top_k),
        "bytes_per_token": int(top_k) * (TARGET_ITEMSIZE[target_dtype] + _ID_BYTES),
        "full_vocab_bytes_per_token": int(vocab_size) * 4,
    }


def logit_width(model_dir: str | Path) -> int | None:
    """The logit width (embedding rows, padding included) from a model directory's config.json;
    None when the directory is not local or names no vocab_size."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if isinstance(size, int) else None


def transport_entry(
    config: Config, tokenizer_size: int, teacher_dirs: Sequence[str | Path]
) -> dict[str, dict[str, int]]:
    """``{"transport": transport_summary(...)}`` for token-level KD (``{}`` for sequence-level KD,
    which sends text): the widest teacher's logits against what ``teachers.top_k`` /
    ``teachers.target_dtype`` send (k is capped at the tokenizer, as the teachers cap it)."""
    if config.distill.objective != "token":
        return {}
    widths = [w for w in (logit_width(d) for d in teacher_dirs) if w is not None]
    vocab = max(widths, default=tokenizer_size)
    top_k = min(config.teachers.top_k, tokenizer_size)
    return {"transport": transport_summary(vocab, top_k, config.teachers.target_dtype)}
