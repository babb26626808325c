"""Strict loading of model weights, aware of tied weights.

``load_state_dict(strict=False)`` silently keeps the random initial value of any weight the file
lacks (a checkpoint of another model, a renamed layer), so a run could continue from a student
that is half untrained. :func:`load_state_strict` refuses any missing, unexpected or wrongly shaped
key with one message naming them. The one allowed gap is a tied weight: checkpoints store
``lm_head.weight`` and ``embed_tokens.weight`` once when they share memory (safetensors refuses
shared tensors), and loading one sets both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clpd_ray.errors import ModelLoadError

__all__ = ["load_state_strict"]

_SHOWN = 5  # keys named per kind in the error message


def _tied_partners(model_state: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Each key of ``model_state`` -> the other keys whose tensor shares its memory."""
    by_ptr: dict[int, list[str]] = {}
    for k, v in model_state.items():
        if v.numel() > 0:  # empty tensors all report data_ptr 0
            by_ptr.setdefault(v.data_ptr(), []).append(k)
    return {k: [o for o in keys if o != k] for keys in by_ptr.values() for k in keys}


def load_state_strict(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], *, what: str
) -> None:
    """Load ``state`` into ``model``: every key must match in name and shape, except a tied
    weight given through its partner. Raises :class:`ModelLoadError` naming ``what`` (the file
    or snapshot) and the keys that do not match."""
    own = model.state_dict()
    partners = _tied_partners(own)
    full = dict(state)
    missing = []
    for k in own:
        if k in full:
            continue
        given = next((p for p in partners.get(k, []) if p in state), None)
        if given is None:
            missing.append(k)
        else:
            full[k] = state[given]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
        for k in state
        if k in own and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = [
            f"{label} {len(keys)}: {', '.join(keys[:_SHOWN])}{' ...' if len(keys) > _SHOWN else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", wrong))
            if keys
        ]
        raise ModelLoadError(
            f"{what} does not match the model ({'; '.join(parts)}); it was written for another "
            "model: use the checkpoint of a run with the same student config"
        )
    model.load_state_dict(full, strict=True)
