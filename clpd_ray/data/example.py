"""One reasoning example and the exact-match answer checker.

An example is split where generation starts: the model sees ``prompt`` and must produce
``target`` (its chain of thought, then a final line ``#... answer``). The same shape serves the
embedded synthetic task and real datasets such as GSM8K (whose answers end in ``#### 72``).

:class:`AnswerExtractor` reads the final answer of a generated text and normalises it by answer
type. Where the answer is, in order of trust:

1. the text after the last ``#`` marker (``#4``, ``#### 72 clips``) or inside the last
   ``\\boxed{...}``, whichever comes later in the text;
2. only with ``last_number_fallback``: the last answer-like token anywhere in the text (the last
   number; for choices the last ``(C)`` / ``C)``; for booleans the last yes/no/true/false).

Normalisation per ``answer_type``: ``number`` (first number of the answer text; thousands
commas, ``$``, ``%`` and a trailing ``.0`` dropped, ``\\frac{a}{b}`` and ``a/b`` as their value),
``choice`` (a letter A-E, also written ``(C)``, ``C)``, ``C.``), ``boolean`` (yes/true ->
``true``, no/false -> ``false``) and ``text`` (lower case, single spaces, no final period).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from clpd_ray.config import Config

__all__ = [
    "AnswerExtractor",
    "AnswerType",
    "Example",
    "answers_match",
    "extract_answer",
    "normalise_answer",
]

AnswerType = Literal["number", "choice", "boolean", "text"]

# The final answer follows the last run of '#' marks: "#4" (embedded task) or "#### 1,234" (GSM8K).
_ANSWER_RE = re.compile(r"#+[ \t]*([^\n#<]*)")
_BOXED_RE = re.compile(r"\\boxed\s*\{")
# A number: optional sign (not a hyphen inside a word or range), thousands groups, decimals.
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])-?\.\d+")
_FRACTION_RE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)\s*$")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.]+)\s*\}\s*\{\s*([\d.]+)\s*\}")
# A letter opening the answer: "C", "(C)", "C) 600"; lower case only as "(c)", "c)", "c." or alone
# (so "a total of 5" is no answer).
_CHOICE_START_RE = re.compile(r"^\s*\(?(?:([A-E])(?![A-Za-z])|([a-e])(?:[).]|\s*$))")
_CHOICE_ANY_RE = re.compile(r"(?<![A-Za-z])\(?([A-E])(?:\)|(?![A-Za-z]))")
_CHOICE_FALLBACK_RE = re.compile(r"\(([A-Ea-e])\)|(?<![A-Za-z])([A-E])\)")
_BOOL_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)
_BOOL_VALUE = {"yes": "true", "true": "true", "no": "false", "false": "false"}


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
    number = _canonical_number(s)
    return number if number is not None else s.lower()


def _canonical_number(s: str) -> str | None:
    """'1234', '-3', '0.5' for a plain numeral (commas already removed); None otherwise."""
    try:
        return str(int(s))  # exact for integers of any size
    except ValueError:
        pass
    try:
        value = float(s)
    except ValueError:
        return None
    if value != value or value in (float("inf"), float("-inf")):
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def _fraction_value(num: str, den: str) -> str | None:
    try:
        d = float(den)
        return _canonical_number(repr(float(num) / d)) if d else None
    except ValueError:
        return None


def _boxed_spans(text: str) -> list[tuple[int, str]]:
    """(start, content) of every ``\\boxed{...}``, braces balanced; an unclosed one runs to the end."""
    out = []
    for m in _BOXED_RE.finditer(text):
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        out.append((m.start(), text[m.end() : i - 1 if depth == 0 else i]))
    return out


@dataclass(frozen=True)
class AnswerExtractor:
    """Reads and normalises final answers of one answer type (see the module docstring)."""

    answer_type: AnswerType = "number"
    last_number_fallback: bool = False

    @classmethod
    def from_config(cls, config: Config) -> AnswerExtractor:
        d = config.data
        return cls(answer_type=d.answer_type, last_number_fallback=d.last_number_fallback)

    def normalise(self, raw: str) -> str | None:
        """The canonical form of an answer text (a gold answer or an extracted one), or None."""
        if self.answer_type == "number":
            return self._number(raw)
        if self.answer_type == "choice":
            start = _CHOICE_START_RE.match(raw)
            if start:
                return (start.group(1) or start.group(2)).upper()
            m = _CHOICE_ANY_RE.search(raw)
            return m.group(1) if m else None
        if self.answer_type == "boolean":
            b = _BOOL_RE.search(raw)
            return _BOOL_VALUE[b.group(1).lower()] if b else None
        text = " ".join(raw.replace("\\text", "").split()).strip(" .\"'").lower()
        return text or None

    def extract(self, text: str) -> str | None:
        """The normalised final answer in ``text``, or None if there is none."""
        spans = [(m.start(), m.group(1)) for m in _ANSWER_RE.finditer(text)]
        spans += _boxed_spans(text)
        for _, raw in sorted(spans, reverse=True):
            if raw.strip():  # the last non-blank answer decides
                got = self.normalise(raw)
                if got is not None or not self.last_number_fallback:
                    return got
                break
        return self._fallback(text) if self.last_number_fallback else None

    def matches(self, text: str, gold: str) -> bool:
        got = self.extract(text)
        return got is not None and got == self.normalise(gold)

    def _number(self, raw: str) -> str | None:
        s = raw.replace("$", "").replace("%", "")
        frac = _LATEX_FRAC_RE.search(s)
        if frac:
            return _fraction_value(frac.group(1), frac.group(2))
        ratio = _FRACTION_RE.match(s)
        if ratio:
            return _fraction_value(ratio.group(1), ratio.group(2))
        m = _NUMBER_RE.search(s)  # the first number: "72 clips" -> 72, "3,4" -> 3
        return _canonical_number(m.group(0).replace(",", "")) if m else None

    def _fallback(self, text: str) -> str | None:
        if self.answer_type == "number":
            nums = _NUMBER_RE.findall(text.replace("$", ""))
            return _canonical_number(nums[-1].replace(",", "")) if nums else None
        if self.answer_type == "choice":
            hits = _CHOICE_FALLBACK_RE.findall(text)
            return (hits[-1][0] or hits[-1][1]).upper() if hits else None
        if self.answer_type == "boolean":
            words = _BOOL_RE.findall(text)
            return _BOOL_VALUE[words[-1].lower()] if words else None
        return None


_DEFAULT = AnswerExtractor()


def extract_answer(generated: str) -> str | None:
    """The final numeric answer in generated text (after the last '#' marker or in \\boxed{}), or None."""
    return _DEFAULT.extract(generated)


def answers_match(generated: str, reference: str) -> bool:
    return _DEFAULT.matches(generated, reference)
