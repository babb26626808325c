"""Actor ``__init__`` failures as package errors, in a module light enough for every actor.

The launcher wraps each actor class with :func:`reporting_init_errors` before making it remote;
Ray pickles the wrapper by value, so whatever it refers to is imported in the actor's process
before ``__init__`` runs. Keeping it here (errors and ``os`` only), rather than in the launcher,
keeps the scheduler's process from importing torch and transformers through the launcher's own
imports: its start costs the policy's imports, not a model stack's.
"""

from __future__ import annotations

import os
from typing import Any

from clpd_ray.errors import ActorInitError, ClpdError

__all__ = ["first_line", "reporting_init_errors"]


def reporting_init_errors(cls: type, name: str, source: str) -> type:
    """``cls`` whose ``__init__`` failures become :class:`ActorInitError` naming the actor and
    what it was loading, so the driver reports them (exit 2) instead of an opaque actor death.

    Ray does not restart an actor whose ``__init__`` raised; the failure reaches the driver as an
    ``ActorDiedError`` whose text ends with this error (``executor.unwrap`` re-raises it).
    """

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        try:
            cls.__init__(self, *args, **kwargs)  # type: ignore[misc]
        except ClpdError as err:
            raise ActorInitError(f"{name} ({source}) failed to start: {err}") from None
        except Exception as err:
            raise ActorInitError(
                f"{name} ({source}) failed to start: {type(err).__name__}: {first_line(err)} "
                f"(pid {os.getpid()}); check that the input loads on that node (a path every "
                "node can read, a hub id or an s3:// URI) and fits its memory"
            ) from None

    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": __name__})


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (at most 300 characters)."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "(no message)"
