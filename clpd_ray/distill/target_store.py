"""Keys and file format of the teacher target store (pure functions; I/O: runtime/target_store.py).

A stored entry is one example's compact top-k targets from one teacher: the (n, K) log-probability
and id rows of its n scored positions (messages.TeacherTargets, compact layout). Entries are found
by two keys, so an entry is never served for another teacher, setting or tokenization:

    teacher key  sha256(teacher fingerprint, k, temperature, target dtype, format version)
                 -> the store directory <root>/<teacher>-<key[:16]>/
    row key      sha256(example id, the row's token ids, attention mask and loss mask, up to
                 its last real or scored token) -> the entry within that directory

The teacher fingerprint (runtime/actors/teacher.py) covers the weights, the model config, the
weight dtype and the device kind. A batch's compact targets are its rows' entries concatenated
in row order (:func:`join_rows`), because compact row n is the n-th True of the loss mask in
row-major order.

Part files: each write is one immutable ``.npz`` holding ``keys`` (P,) str, ``counts`` (P,) int64
(scored positions per entry), and the entries' ``logprobs`` / ``ids`` stacked, (sum counts, K).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from collections.abc import Sequence

import numpy as np

from clpd_ray.distill.chunked import used_width

__all__ = [
    "FORMAT_VERSION",
    "Entry",
    "join_rows",
    "pack_part",
    "row_keys",
    "split_rows",
    "teacher_key",
    "unpack_part",
]

FORMAT_VERSION = 1  # bump when the computation or the layout of stored targets changes
Entry = tuple[np.ndarray, np.ndarray]  # one example: (logprobs (n, K), ids (n, K))


def teacher_key(fingerprint: str, top_k: int, temperature: float, target_dtype: str) -> str:
    """The hex sha256 naming a teacher's store directory: every setting its targets depend on."""
    text = f"v{FORMAT_VERSION}|{fingerprint}|k={int(top_k)}|T={float(temperature)!r}|{target_dtype}"
    return hashlib.sha256(text.encode()).hexdigest()


def row_keys(
    example_ids: np.ndarray,
    input_ids: np.ndarray,
    attention_mask: np.ndarray,
    loss_mask: np.ndarray,
) -> list[str]:
    """One hex sha256 per batch row: its example id and tokenization, trailing padding excluded
    (so the same example padded to another batch width has the same key)."""
    ids = np.asarray(example_ids).reshape(-1)
    if ids.shape[0] != np.asarray(input_ids).shape[0]:
        raise ValueError(f"{ids.shape[0]} example ids for {np.asarray(input_ids).shape[0]} rows")
    keys = []
    for r in range(ids.shape[0]):
        w = used_width(attention_mask[r : r + 1], loss_mask[r : r + 1])
        h = hashlib.sha256(np.int64(ids[r]).tobytes())
        for part, dtype in ((input_ids, np.int64), (attention_mask, np.int64), (loss_mask, bool)):
            h.update(b"|")
            h.update(np.ascontiguousarray(np.asarray(part)[r, :w], dtype=dtype).tobytes())
        keys.append(h.hexdigest())
    return keys


def split_rows(logprobs: np.ndarray, ids: np.ndarray, loss_mask: np.ndarray) -> list[Entry]:
    """Compact (N, K) targets of a batch -> one entry per row (its scored positions, in order)."""
    counts = np.asarray(loss_mask, dtype=bool).sum(axis=1)
    if int(counts.sum()) != logprobs.shape[0] or logprobs.shape != ids.shape:
        raise ValueError(
            f"targets of shape {logprobs.shape} / {ids.shape} do not fit a mask with "
            f"{int(counts.sum())} scored positions"
        )
    cuts = np.cumsum(counts)[:-1]
    return list(zip(np.split(logprobs, cuts), np.split(ids, cuts), strict=True))


def join_rows(entries: Sequence[Entry], top_k: int, lp_dtype: np.dtype) -> Entry:
    """The compact (N, K) targets of a batch from its rows' entries, in row order."""
    if not entries:
        return np.zeros((0, top_k), dtype=lp_dtype), np.zeros((0, top_k), dtype=np.int32)
    return np.concatenate([e[0] for e in entries]), np.concatenate([e[1] for e in entries])


def pack_part(keys: Sequence[str], entries: Sequence[Entry]) -> bytes:
    """Entries -> the bytes of one part file (uncompressed npz)."""
    if len(keys) != len(entries) or not keys:
        raise ValueError(f"pack_part: {len(keys)} keys for {len(entries)} entries")
    lp, ids = join_rows(entries, entries[0][0].shape[1], entries[0][0].dtype)
    buf = io.BytesIO()
    np.savez(
        buf,
        keys=np.asarray(keys, dtype="U64"),
        counts=np.asarray([e[0].shape[0] for e in entries], dtype=np.int64),
        logprobs=lp,
        ids=ids,
    )
    return buf.getvalue()


def unpack_part(data: bytes) -> dict[str, Entry]:
    """The bytes of a part file -> ``{row key: entry}``; ValueError for a damaged file."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            keys, counts, lp, ids = z["keys"], z["counts"], z["logprobs"], z["ids"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"not a target-store part file ({err})") from None
    if int(counts.sum()) != lp.shape[0] or lp.shape != ids.shape or keys.shape != counts.shape:
        raise ValueError("target-store part file: its arrays do not fit together")
    if keys.size == 0:
        return {}
    cuts = np.cumsum(counts)[:-1]
    rows = zip(np.split(lp, cuts), np.split(ids, cuts), strict=True)
    return dict(zip((str(k) for k in keys), rows, strict=True))
