"""Field mappings, difficulty and answer extraction of known reasoning datasets.

``data.preset: gsm8k`` fills the ``data.*`` keys below; keys given explicitly override them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS"]

PRESETS: dict[str, dict[str, Any]] = {
    # openai/grade-school-math: "answer" is the CoT, one step per line, ending "#### N".
    "gsm8k": {"prompt_field": "question", "cot_field": "answer", "cot_steps": "lines"},
}
