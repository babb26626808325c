"""Field mappings, difficulty and answer extraction of known reasoning datasets.

``data.preset: gsm8k`` fills the ``data.*`` keys below; keys given explicitly override them
(``prompt_field`` given explicitly also replaces a preset's ``prompt_template``). The field names
are those of the public files (see ``../shared/data/README.md`` in the development setup):

- gsm8k: ``question`` / ``answer`` (steps one per line, final line ``#### N``); the answer is
  read after ``####``, no last-number fallback.
- svamp: prompt ``Body`` + ``Question``; CoT = ``Equation`` (difficulty: its operators);
  answer ``Answer`` (a float); last-number fallback on (a bare equation's result).
- aqua: prompt ``question`` + the five ``options``; CoT = ``rationale``; answer ``correct`` (A-E).
- strategyqa: ``question``; CoT = ``decomposition`` (a list of sub-questions, one step each);
  answer ``answer`` (a boolean, written ``true`` / ``false``).
- mawps: ``original_text``; CoT = ``equation`` (difficulty: its operators); answer ``ans``.
"""

from __future__ import annotations

import string
from typing import Any

__all__ = ["PRESETS", "apply_preset", "template_fields"]

PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "prompt_field": "question",
        "cot_field": "answer",
        "cot_steps": "lines",
        "answer_type": "number",
        "last_number_fallback": False,
    },
    "svamp": {
        "prompt_template": "{Body} {Question}",
        "cot_field": "Equation",
        "answer_field": "Answer",
        "cot_steps": "ops",
        "answer_type": "number",
        "last_number_fallback": True,
    },
    "aqua": {
        "prompt_template": "{question}\nOptions: {options}",
        "cot_field": "rationale",
        "answer_field": "correct",
        "cot_steps": "lines",
        "answer_type": "choice",
        "last_number_fallback": False,
    },
    "strategyqa": {
        "prompt_field": "question",
        "cot_field": "decomposition",
        "answer_field": "answer",
        "cot_steps": "lines",
        "answer_type": "boolean",
        "last_number_fallback": False,
    },
    "mawps": {
        "prompt_field": "original_text",
        "cot_field": "equation",
        "answer_field": "ans",
        "cot_steps": "ops",
        "answer_type": "number",
        "last_number_fallback": True,
    },
}


def apply_preset(raw: Any) -> Any:
    """The ``data`` section ``raw`` with its preset's keys filled in under the explicit ones."""
    if not isinstance(raw, dict) or raw.get("preset") is None:
        return raw
    preset = PRESETS.get(raw["preset"]) if isinstance(raw["preset"], str) else None
    if preset is None:
        return raw  # the Literal check reports the allowed names
    filled = {**preset, **raw}
    if "prompt_field" in raw and "prompt_template" not in raw:
        filled.pop("prompt_template", None)  # an explicit field replaces the preset's template
    return filled


def template_fields(template: str) -> list[str]:
    """The field names of a ``data.prompt_template``; ValueError if it is malformed."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ValueError(
            f"prompt_template {template!r} is not a valid template ({err}); write fields as "
            "{Field} and literal braces as {{ }}, e.g. '{Body} {Question}'"
        ) from None
    bad = [f for f in names if not f or not f.isidentifier()]
    if bad or not names:
        raise ValueError(
            f"prompt_template {template!r} must name at least one field, each as a plain "
            "{Field} (no index, attribute or positional {}), e.g. '{Body} {Question}'"
        )
    return list(dict.fromkeys(names))
