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
from collections import OrderedDict
from collections.abc import Sequence

from clpd_ray.config import Config
from clpd_ray.distill.target_store import Entry, pack_part, unpack_part
from clpd_ray.runtime import storage

__all__ = ["OFF", "TargetStore", "store_location"]

OFF = "off"  # teachers.target_store value that disables the store
_PART_CACHE = 16  # part files kept in memory per teacher (least recently used dropped first)


def store_location(config: Config, run_uri: str) -> str | None:
    """The store root for a run: ``teachers.target_store`` resolved, ``<run>/targets`` when
    unset, None when ``off`` (or for sequence-level KD, which sends text, not targets)."""
    where = config.teachers.target_store
    if where == OFF or config.distill.objective != "token":
        return None
    if where is None:
        return storage.join(run_uri, "targets")
    return storage.resolve(where)


class TargetStore:
    """One teacher's entries under ``<root>/<teacher>-<key[:16]>``; counts hits and misses."""

    def __init__(self, root: str, teacher: str, key: str) -> None:
        self.key = key
        self.dir = storage.join(root, f"{teacher}-{key[:16]}")
        self._index: dict[str, str] = {}  # row key -> part name
        self._indexed: set[str] = set()  # part names whose keys are in the index
        self._parts: OrderedDict[str, dict[str, Entry]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.ahead = 0  # entries computed by work ahead (precompute), not by a request
        self.written = 0  # entries this process wrote

    def refresh(self) -> int:
        """Index the parts written since the last refresh (by anyone); returns how many."""
        new = 0
        for name in storage.list_dir(self.dir):
            if not name.endswith(".keys") or name in self._indexed:
                continue
            part = name[: -len(".keys")]
            for key in storage.read_text(storage.join(self.dir, name)).split():
                self._index.setdefault(key, part)
            self._indexed.add(name)
            new += 1
        return new

    def _part(self, part: str) -> dict[str, Entry]:
        entries = self._parts.get(part)
        if entries is None:
            entries = unpack_part(storage.read_bytes(storage.join(self.dir, f"{part}.npz")))
            self._parts[part] = entries
            while len(self._parts) > _PART_CACHE:
                self._parts.popitem(last=False)
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
        """The stored entry of each key, None where there is none (the index is refreshed once
        when a key is missing: another process may have written it)."""
        if any(k not in self._index for k in keys):
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
        self._parts[part] = dict(zip(keys, entries, strict=True))
        for k in keys:
            self._index[k] = part
        while len(self._parts) > _PART_CACHE:
            self._parts.popitem(last=False)
        self.written += len(keys)

    def stats(self) -> dict[str, int]:
        """Rows served from the store (``hits``), computed for a request (``misses``) and
        computed ahead by an idle teacher (``ahead``), by this process."""
        return {"hits": self.hits, "misses": self.misses, "ahead": self.ahead}
