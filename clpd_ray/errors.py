"""The package's exception hierarchy.

Every error a user can cause derives from :class:`ClpdError`; the CLI turns those into exit code 2
with one message and no traceback. Anything else is an internal error (exit 1). The classes are
plain and picklable so they cross Ray actor boundaries intact (Ray wraps them in ``RayTaskError``
whose ``cause`` is the original instance).
"""

from __future__ import annotations

__all__ = [
    "ActorInitError",
    "ClpdError",
    "ClusterError",
    "ConfigError",
    "DataError",
    "DivergedError",
    "ModelLoadError",
    "PolicyError",
    "RunDirError",
    "StorageError",
    "TokenizerMismatchError",
]


class ClpdError(Exception):
    """A problem the user can fix: bad config, data, model path, policy or arguments."""


class ConfigError(ClpdError):
    """The configuration is invalid (unknown key, wrong type, out-of-range value)."""


class DataError(ClpdError):
    """A dataset is missing, empty, or has rows without a mapped field."""


class ModelLoadError(ClpdError):
    """A model or tokenizer path cannot be loaded."""


class TokenizerMismatchError(ClpdError):
    """Teacher and student tokenizers differ, so token-level KD is impossible."""


class PolicyError(ClpdError):
    """A scheduling policy cannot be loaded, or returned an invalid decision."""


class RunDirError(ClpdError):
    """The run directory cannot be used (exists already, or is not a run to resume)."""


class StorageError(ClpdError):
    """A storage location (local path or ``s3://`` URI) is malformed, unreachable or unreadable."""


class ClusterError(ClpdError):
    """The Ray cluster cannot be reached, refuses this client's credentials, or lacks the
    resources the run needs (for example fewer GPUs than ``cluster.gpus_per_actor`` asks for)."""


class ActorInitError(ClpdError):
    """An actor's ``__init__`` raised (a model it cannot load, out of memory, ...): starting it
    again would fail the same way, so the run stops with the actor's name, input and cause."""


class DivergedError(ClpdError):
    """A training step produced a non-finite loss or gradient: the step is not applied, and the
    run stops naming the step and the setting that most likely caused it."""
