"""The teacher target store on the run's storage (local path, shared filesystem or s3://).

Layout (keys and part format: distill/target_store.py)::

    <root>/<teacher>-<teacher key[:16]>/
        part-<digest>.npz     one write: the entries (examples' top-k rows) computed together
        part-<digest>.keys    its row keys, one per line; written after the .npz, so a part
                              whose .keys file exists is complete (a crash leaves at most an
                              unindexed .npz, never read)

``<root>`` is ``teachers.target_store``: unset, ``<run>/targets`` (survives a restart and
``--resume``); a location, a store shared by every run pointing at it (ablation arms and seeds
reuse each other's targets); ``off``, no store. Parts are immutable and named by their keys, so
concurrent writers (replicas, parallel runs) never damage each other: two writes of the same
rows write the same file with the same content.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence

from clpd_ray.config import Config
from clpd_ray.distill.target_store import Entry, pack_part, unpack_part
from clpd_ray.runtime import storage

__all__ = ["OFF", "RUN", "TargetStore", "store_location"]

OFF = "off"  # teachers.target_store value that disables the store
RUN = "run"  # teachers.target_store value for a store in the run's own storage: <run>/targets
# Bytes of parts a teacher keeps in memory (least recently used dropped first): at real sizes a
# stage's targets (a few thousand examples x a few hundred tokens x k=64 x 6 B) fit, so a part is
# read once per run even when another run's sampler order wrote it.
_CACHE_BYTES = 1 << 30
# List the store for other writers' parts (replicas of the teacher, parallel runs) at most this
# often when a request has a missing row: on s3 a listing is a paid request; a local or shared
# filesystem is listed on every such request, so a replica sees at once what another one worked
# ahead (a part missed is recomputed with the same bits: only work is lost).
_REFRESH_S = 30.0
_REFRESH_S_LOCAL = 0.0


def store_location(config: Config, run_uri: str) -> str | None:
    """The store root for a run: ``teachers.target_store`` resolved, ``<run>/targets`` for
    ``run``, None when unset or ``off`` (and for sequence-level KD, which sends text, not
    targets). ``clpd ablate`` turns an unset store into one shared by its arms and seeds."""
    where = config.teachers.target_store
    if where is None or where == OFF or config.distill.objective != "token":
        return None
    if where == RUN:
        return storage.join(run_uri, "targets")
    return storage.resolve(where)


class TargetStore:
    """One teacher's entries under ``<root>/<teacher>-<key[:16]>``; counts hits and misses."""

    def __init__(
        self,
        root: str,
        teacher: str,
        key: str,
        *,
        cache_bytes: int = _CACHE_BYTES,
        refresh_s: float | None = None,
    ) -> None:
        """``refresh_s``: how stale the index of other writers' parts may get (a part missed
        is recomputed, with the same bits: only work is lost); None: 30 s on s3, 0 on a
        filesystem."""
        self.key = key
        self.cache_bytes = cache_bytes
        if refresh_s is None:
            refresh_s = _REFRESH_S if storage.is_s3(root) else _REFRESH_S_LOCAL
        self.refresh_s = refresh_s
        self._refreshed: float | None = None  # time.monotonic() of the last listing
        self.dir = storage.join(root, f"{teacher}-{key[:16]}")
        self._index: dict[str, str] = {}  # row key -> part name
        self._indexed: set[str] = set()  # part names whose keys are in the index
        self._parts: OrderedDict[str, dict[str, Entry]] = OrderedDict()
        self._part_bytes: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        self.ahead = 0  # entries computed by work ahead (precompute), not by a request
        self.written = 0  # entries this process wrote

    def refresh(self) -> int:
        """Index the parts written since the last refresh (by anyone); returns how many."""
        new = 0
        self._refreshed = time.monotonic()
        for name in storage.list_dir(self.dir):
            if not name.endswith(".keys") or name in self._indexed:
                continue
            part = name[: -len(".keys")]
            for key in storage.read_text(storage.join(self.dir, name)).split():
                self._index.setdefault(key, part)
            self._indexed.add(name)
            new += 1
        return new

    def _keep(self, part: str, entries: dict[str, Entry]) -> None:
        """Cache a part's entries, dropping the least recently used beyond ``cache_bytes``."""
        self._parts[part] = entries
        self._part_bytes[part] = sum(lp.nbytes + ids.nbytes for lp, ids in entries.values())
        while len(self._parts) > 1 and sum(self._part_bytes.values()) > self.cache_bytes:
            old, _ = self._parts.popitem(last=False)
            del self._part_bytes[old]

    def _part(self, part: str) -> dict[str, Entry]:
        entries = self._parts.get(part)
        if entries is None:
            entries = unpack_part(storage.read_bytes(storage.join(self.dir, f"{part}.npz")))
            self._keep(part, entries)
        self._parts.move_to_end(part)
        return entries

    def _lookup(self, key: str) -> Entry | None:
        part = self._index.get(key)
        if part is None:
            return None
        try:
            return self._part(part).get(key)
        except ValueError:  # a damaged part: recompute its entries (a new part replaces it)
            for k in [k for k, p in self._index.items() if p == part]:
                del self._index[k]
            return None

    def get(self, keys: Sequence[str]) -> list[Entry | None]:
        """The stored entry of each key, None where there is none (when a key is missing, the
        index is refreshed if it is older than ``refresh_s``: another process may have written
        it)."""
        stale = self._refreshed is None or time.monotonic() - self._refreshed >= self.refresh_s
        if stale and any(k not in self._index for k in keys):
            self.refresh()
        return [self._lookup(k) for k in keys]

    def put(self, keys: Sequence[str], entries: Sequence[Entry]) -> None:
        """Write ``entries`` as one part (the .npz, then its .keys); no-op when empty."""
        if not keys:
            return
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:24]
        part = f"part-{digest}"
        storage.write_bytes(storage.join(self.dir, f"{part}.npz"), pack_part(keys, entries))
        storage.write_text(storage.join(self.dir, f"{part}.keys"), "\n".join(keys) + "\n")
        self._indexed.add(f"{part}.keys")
        self._keep(part, dict(zip(keys, entries, strict=True)))
        for k in keys:
            self._index[k] = part
        self.written += len(keys)

    def stats(self) -> dict[str, int]:
        """Rows served from the store (``hits``), computed for a request (``misses``) and
        computed ahead by an idle teacher (``ahead``), by this process."""
        return {"hits": self.hits, "misses": self.misses, "ahead": self.ahead}
