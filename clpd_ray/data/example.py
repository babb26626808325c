"""One reasoning example and the exact-match answer checker.

An example is split where generation starts: the model sees ``prompt`` and must produce
``target`` (its chain of thought, then a final line ``#... answer``). The same shape serves the
embedded synthetic task and real datasets such as GSM8K (whose answers end in ``#### 72``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Example", "answers_match", "extract_answer", "normalise_answer"]

# The final answer follows the last run of '#' marks: "#4" (embedded task) or "#### 1,234" (GSM8K).
_ANSWER_RE = re.compile(r"#+[ \t]*([^\n#<]*)")


@dataclass(frozen=True)
class Example:
    prompt: str  # conditioning text; generation starts right after it
    target: str  # chain of thought + final answer line: what the student learns to generate
    answer: str  # the canonical final answer, for exact match
    steps: int  # reasoning steps in the chain of thought (the static, CoT-derived difficulty)


def normalise_answer(text: str) -> str:
    """Canonical form for comparison: no spaces or thousands commas, '72.0' == '72', no '$'."""
    s = text.strip().replace(",", "").replace("$", "").replace(" ", "")
    s = s.rstrip(".")
    try:
        return str(int(s))  # exact for integers of any size
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        return s.lower()
    if value.is_integer():
        return str(int(value))
    return repr(value)


def extract_answer(generated: str) -> str | None:
    """The final answer in generated text (after the last '#' marker), or None if there is none."""
    matches = _ANSWER_RE.findall(generated)
    for m in reversed(matches):
        if m.strip():
            return normalise_answer(m)
    return None


def answers_match(generated: str, reference: str) -> bool:
    got = extract_answer(generated)
    return got is not None and got == normalise_answer(reference)
