"""One teacher served by N actors (``teachers.ladder[].replicas``) behind one handle-like object.

The launcher hands the executor a :class:`TeacherPool` wherever it used to hand a teacher's actor
handle, and the pool is called the same way::

    pool.targets.remote(batch)                          ──▶ one replica (below), its ObjectRef
    pool.precompute.remote(batch)                       ──▶ one replica
    pool.generate.options(num_returns=2).remote(...)    ──▶ one replica, its two refs
    pool.evaluate.remote(...)                           ──▶ one replica
    pool.stats.remote()      ──▶ every replica's stats, summed (counts, busy time): one ref
    pool.ping.remote()       ──▶ every replica's answer: a list of refs (ray.get waits for all)

Load balancing: a request goes to the replica with the fewest outstanding requests (submitted,
result not yet produced); ties go round robin from the replica after the last one picked, so a
steady stream alternates over idle replicas. A replica's result never depends on which replica
computed it: every replica loads the same weights and runs the same code on the whole request
(the same micro-batching without a store; per-row passes with one). Replicas are separate actors,
so Ray restarts a killed one and re-runs its requests on it, as for a single teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ray

__all__ = ["TeacherPool", "merge_stats"]

# Calls answered by every replica, not by one: stats (summed) and ping (liveness of each).
_FANOUT = {"stats", "ping"}


def _ray_done(refs: list[Any]) -> list[Any]:
    """The refs whose results exist (never waits, never fetches them)."""
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    return done


def merge_stats(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One teacher's ``TeacherService.stats()`` over its replicas: time and counts summed
    (``busy_s``, ``bytes_sent``, ``tokens_sent``, every ``target_store`` count), the model's
    properties (name, parameters, logit width) from the first; ``replicas`` and each one's
    ``replica_busy_s`` added when there are several."""
    if len(stats) == 1:
        return dict(stats[0])
    out = dict(stats[0])
    for key in ("busy_s", "bytes_sent", "tokens_sent"):
        if key in out:
            out[key] = sum(s.get(key, 0) for s in stats)
    stores = [s["target_store"] for s in stats if "target_store" in s]
    if stores:
        out["target_store"] = {
            k: sum(s.get(k, 0) for s in stores) for k in sorted({k for s in stores for k in s})
        }
    out["replicas"] = len(stats)
    out["replica_busy_s"] = [s.get("busy_s", 0.0) for s in stats]
    return out


@ray.remote(num_cpus=0)
def _merged(*stats: dict[str, Any]) -> dict[str, Any]:
    return merge_stats(stats)


class _Method:
    """``pool.<method>`` (optionally ``.options(...)``), submitted with ``.remote(...)``."""

    def __init__(self, pool: TeacherPool, name: str, options: dict[str, Any] | None = None):
        self._pool = pool
        self._name = name
        self._opts = options or {}

    def options(self, **options: Any) -> _Method:
        return _Method(self._pool, self._name, {**self._opts, **options})

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._pool._submit(self._name, self._opts, args, kwargs)


class TeacherPool:
    """The replicas of one teacher; ``pool.<method>.remote(...)`` as on an actor handle."""

    def __init__(
        self,
        name: str,
        replicas: Sequence[Any],
        *,
        done: Callable[[list[Any]], list[Any]] = _ray_done,
    ) -> None:
        """``name``: the teacher's actor name (replica 0's); ``replicas``: the actor handles;
        ``done``: which of some refs have results (``ray.wait`` with no timeout; tests pass
        their own)."""
        if not replicas:
            raise ValueError(f"teacher pool {name!r} needs at least one replica")
        self.name = name
        self.replicas = list(replicas)
        self.sent = [0] * len(self.replicas)  # requests sent to each replica
        self._outstanding: list[list[Any]] = [[] for _ in self.replicas]
        self._next = 0  # where the round robin over equally loaded replicas starts
        self._done = done

    def __getattr__(self, method: str) -> _Method:
        # Only the methods of the actor (and Ray's __ray_call__); not pickle's or copy's probes.
        if method.startswith("_") and method != "__ray_call__":
            raise AttributeError(method)
        return _Method(self, method)

    def __repr__(self) -> str:
        return f"TeacherPool({self.name}, replicas={len(self.replicas)})"

    def __len__(self) -> int:
        return len(self.replicas)

    # ------------------------------------------------------------------ balancing
    def load(self) -> list[int]:
        """Outstanding requests per replica (finished ones dropped first)."""
        for out in self._outstanding:
            if out:
                finished = {id(r) for r in self._done(list(out))}
                out[:] = [r for r in out if id(r) not in finished]
        return [len(out) for out in self._outstanding]

    def pick(self) -> int:
        """The replica for the next request: fewest outstanding, ties round robin."""
        loads = self.load()
        n = len(loads)
        order = [(self._next + k) % n for k in range(n)]
        r = min(order, key=lambda x: loads[x])  # min keeps the first of equals
        self._next = (r + 1) % n
        return r

    def outstanding(self) -> list[Any]:
        """The refs of every request not yet finished, over all replicas (none tracked for a
        single replica: its caller keeps its own refs, :meth:`_submit`)."""
        self.load()
        return [r for out in self._outstanding for r in out]

    def replace(self, replica: int, handle: Any) -> None:
        """Put a new actor in place of a replica that is dead for good."""
        self.replicas[replica] = handle
        self._outstanding[replica] = []

    # ------------------------------------------------------------------ calls
    def _submit(self, name: str, opts: dict[str, Any], args: Any, kwargs: Any) -> Any:
        if name in _FANOUT and len(self.replicas) > 1:
            refs = [getattr(h, name).options(**opts).remote(*args, **kwargs) for h in self.replicas]
            return _merged.remote(*refs) if name == "stats" else refs
        single = len(self.replicas) == 1  # nothing to balance: no ray.wait on the driver's path
        r = 0 if single else self.pick()
        method = getattr(self.replicas[r], name)
        if opts:
            method = method.options(**opts)
        out = method.remote(*args, **kwargs)
        if not single:  # a single replica's caller keeps its own refs (outstanding())
            first = out[0] if isinstance(out, list) else out  # num_returns > 1: all come together
            self._outstanding[r].append(first)
        self.sent[r] += 1
        return out
