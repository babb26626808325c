"""Load an external reasoning dataset into :class:`~clpd_ray.data.example.Example` rows.

Files are read with Hugging Face ``datasets``: ``.json`` / ``.jsonl`` (JSON Lines or one JSON
array, whatever the extension says) and ``.parquet``; a directory is read as a dataset saved
with ``save_to_disk``; ``sample:<name>/<file>`` is a sample shipped in the package
(``clpd_ray/data/samples``, e.g. ``sample:gsm8k/train.jsonl``). Each row maps to one example::

    question = row[prompt_field] | prompt_template.format(**row)
    prompt = "Question: {question}\nAnswer:"           (plain format; generation starts after it)
           | "{question}"                              (chat format: the user turn)
    target = " {cot_field}"                            (answer_field unset: CoT ends "#### N")
           | " {cot_field}\n#### {answer_field}"       (answer_field set)
    steps  = count_steps(cot_field, cot_steps)

In plain format the target starts with the space after ``"Answer:"``, so prompt and target meet at
a token boundary of byte-level BPE tokenizers (``'ĠNatal'``, not ``'Ġ' 'N' 'atal'``); the chat
format has no leading space (the template's assistant turn starts on a new line).

Every user mistake raises :class:`~clpd_ray.errors.DataError` naming the file, the row and the fix.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from clpd_ray.curriculum.difficulty import StepMode, count_steps
from clpd_ray.data.example import AnswerExtractor, Example, extract_answer, normalise_answer
from clpd_ray.data.presets import template_fields
from clpd_ray.errors import DataError

__all__ = [
    "SAMPLE_SCHEME",
    "available_samples",
    "format_prompt",
    "hold_out",
    "load_examples",
    "resolve_data_path",
    "template_fields",
    "train_eval_split",
]

_log = logging.getLogger(__name__)

_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_ANSWER_LINE_RE = re.compile(r"^\s*#+")


SAMPLE_SCHEME = "sample:"


def format_prompt(question: str) -> str:
    """The plain-format prompt; generation starts right after ``"Answer:"`` (the target's space)."""
    return f"Question: {question.strip()}\nAnswer:"


def _samples_root() -> Path:
    from importlib.resources import files

    return Path(str(files("clpd_ray"))) / "data" / "samples"


def available_samples() -> list[str]:
    """Every ``sample:<name>/<file>`` shipped in the package."""
    root = _samples_root()
    return sorted(
        f"{SAMPLE_SCHEME}{p.relative_to(root).as_posix()}"
        for p in root.glob("*/*")
        if p.suffix.lower() in _BUILDERS
    )


def resolve_data_path(path: str | Path) -> Path:
    """``path`` as a local path: ``sample:<name>/<file>`` becomes the packaged sample's file.

    An unknown sample is a DataError listing the available ones.
    """
    text = str(path)
    if not text.startswith(SAMPLE_SCHEME):
        return Path(path)
    rel = text[len(SAMPLE_SCHEME) :].strip("/")
    root = _samples_root()
    found = root / rel
    if not rel or ".." in Path(rel).parts or not found.is_file():
        raise DataError(
            f"{text}: no such packaged sample; available: {', '.join(available_samples())}. "
            "Use one of them, or a file path for data.path / data.eval_path"
        )
    return found


def load_examples(
    path: str | Path,
    *,
    prompt_field: str,
    cot_field: str,
    answer_field: str | None = None,
    cot_steps: StepMode = "lines",
    split: str = "train",
    prompt_template: str | None = None,
    chat: bool = False,
    extractor: AnswerExtractor | None = None,
) -> list[Example]:
    """Read ``path`` and map each row to an :class:`Example` (see the module docstring).

    ``split`` picks the split of a saved ``DatasetDict``; a single file is always one split.
    ``prompt_template`` (e.g. ``"{Body} {Question}"``) replaces ``prompt_field``; list values are
    joined by spaces. ``chat``: the prompt is the bare question (the chat template wraps it).
    The CoT field may hold text or a list of strings (joined one per line, e.g. StrategyQA's
    ``decomposition``); the answer field may hold text, a number or a boolean. ``extractor``
    normalises the gold answer by answer type (default: numbers, other text lower-cased).
    Rows with blank text or no final answer are dropped with a warning; any other bad row is
    an error.
    """
    if cot_steps not in ("lines", "calc", "ops"):
        raise DataError(f"cot_steps={cot_steps!r} is not one of 'lines', 'calc', 'ops'")
    p = resolve_data_path(path)
    ds = _load_dataset(p, split)
    available = list(ds.column_names)
    mapped = {"cot_field": cot_field}
    if prompt_template is not None:
        try:
            names = template_fields(prompt_template)
        except ValueError as err:
            raise DataError(f"data.{err}") from None
        mapped.update({f"prompt_template field {{{n}}}": n for n in names})
    else:
        mapped["prompt_field"] = prompt_field
    if answer_field is not None:
        mapped["answer_field"] = answer_field
    if ds.num_rows == 0:
        raise DataError(f"{p}: the dataset is empty (0 rows); point data.path at a file with rows")
    for key, field in mapped.items():
        if field not in available:
            fix = (
                "Fix data.prompt_template to name only those fields."
                if key.startswith("prompt_template")
                else f"Set {key} to one of them."
            )
            raise DataError(
                f"{p}: row 0 (like every row) has no field {field!r} (set by {key}); available fields: "
                f"{', '.join(available)}. {fix}"
            )
    columns = ds.select_columns(list(dict.fromkeys(mapped.values()))).to_dict()
    fields = _Fields(
        p,
        available,
        prompt_field,
        cot_field,
        answer_field,
        cot_steps,
        prompt_template,
        chat,
        extractor,
    )

    examples: list[Example] = []
    dropped: Counter[str] = Counter()
    for i in range(ds.num_rows):
        answer_value = columns[answer_field][i] if answer_field is not None else None
        question = (
            {n: columns[n][i] for n in template_fields(prompt_template)}
            if prompt_template is not None
            else columns[prompt_field][i]
        )
        made = fields.example(i, question, columns[cot_field][i], answer_value)
        if isinstance(made, str):
            dropped[made] += 1
        else:
            examples.append(made)

    if not examples:
        reasons = ", ".join(f"{n} with {why}" for why, n in dropped.items())
        hint = (
            f"the CoT in {cot_field!r} must end with a line '#### <answer>', or set answer_field "
            "to the field holding the answer"
            if answer_field is None
            else f"check that {prompt_field!r}, {cot_field!r} and {answer_field!r} hold non-blank values"
        )
        raise DataError(f"{p}: all {ds.num_rows} rows were dropped ({reasons}); {hint}")
    if dropped:
        _log.warning(
            "%s: dropped %d of %d rows (%s)",
            p,
            sum(dropped.values()),
            ds.num_rows,
            ", ".join(f"{n} with {why}" for why, n in dropped.items()),
        )
    return examples


def train_eval_split(
    examples: Sequence[Example], eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Deterministic random split into (train, eval); each keeps the input order.

    The eval part has ``round(N * eval_fraction)`` rows, at least 1 and at most N - 1.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
    n = len(examples)
    if n < 2:
        raise DataError(
            f"cannot split {n} example(s) into train and eval; provide at least 2, or set data.eval_path"
        )
    n_eval = min(n - 1, max(1, math.floor(n * eval_fraction + 0.5)))
    is_eval = np.zeros(n, dtype=bool)
    is_eval[np.random.default_rng(seed).permutation(n)[:n_eval]] = True
    train = [e for e, ev in zip(examples, is_eval, strict=True) if not ev]
    held_out = [e for e, ev in zip(examples, is_eval, strict=True) if ev]
    return train, held_out


def hold_out(examples: Sequence[Example], n: int, seed: int) -> tuple[list[Example], list[Example]]:
    """Deterministic random ``(rest, held)`` with ``len(held) == min(n, len(examples))``.

    Both keep the input order; the draw differs from :func:`train_eval_split`'s for the same seed.
    """
    n = max(0, min(n, len(examples)))
    chosen = np.zeros(len(examples), dtype=bool)
    chosen[np.random.default_rng([seed, 1]).permutation(len(examples))[:n]] = True
    rest = [e for e, c in zip(examples, chosen, strict=True) if not c]
    held = [e for e, c in zip(examples, chosen, strict=True) if c]
    return rest, held


def _load_dataset(path: Path, split: str) -> Any:
    """A ``datasets.Dataset`` for a file or a ``save_to_disk`` directory."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if not path.exists():
        raise DataError(
            f"data path {path} does not exist (relative paths start at {Path.cwd()}); "
            "check data.path / data.eval_path"
        )
    if path.is_dir():
        try:
            loaded = load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(
                f"{path} is a directory but not a dataset saved with Dataset.save_to_disk; "
                "point at a .json, .jsonl or .parquet file or at a saved dataset directory"
            ) from None
        except Exception as err:
            # datasets cannot reload a saved dataset with 0 rows (0 shards): it raises IndexError.
            if _saved_without_rows(path) or _saved_without_rows(path / split):
                raise DataError(
                    f"{path}: the dataset is empty (0 rows); point data.path at a dataset with rows"
                ) from None
            raise DataError(
                f"{path}: cannot load the saved dataset ({type(err).__name__}: {err}); "
                "save it again with Dataset.save_to_disk"
            ) from None
        if isinstance(loaded, DatasetDict):
            if split not in loaded:
                raise DataError(
                    f"{path}: no split {split!r}; available splits: {', '.join(loaded)}. "
                    "Pass one of them as split."
                )
            loaded = loaded[split]
        return loaded
    builder = _BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; use .json, .jsonl "
            "or .parquet, or a directory saved with Dataset.save_to_disk"
        )
    if _is_blank(path):
        raise DataError(f"{path}: the file is empty; point data.path at a file with rows")
    try:
        return load_dataset(builder, data_files=str(path), split="train")
    except ValueError as err:
        if "corresponds to no data" in str(err):
            raise DataError(
                f"{path}: the dataset is empty (0 rows); point data.path at a file with rows"
            ) from None
        raise DataError(f"{path}: cannot be read as {builder}: {err}") from None
    except Exception as err:  # datasets wraps parser errors; show the underlying one
        cause = err.__cause__ or err
        raise DataError(
            f"{path}: cannot be read as {builder} ({type(cause).__name__}: {cause}); fix the file's syntax"
        ) from None


def _saved_without_rows(path: Path) -> bool:
    """True if ``path`` holds a ``save_to_disk`` dataset written with no data shards."""
    try:
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _is_blank(path: Path) -> bool:
    """True for an empty or whitespace-only file (checks only the first 4 KiB of large files)."""
    with path.open("rb") as f:
        head = f.read(4096)
    return not head.strip() and path.stat().st_size <= 4096


@dataclass(frozen=True)
class _Fields:
    """The field mapping of one file: turns one row's raw values into an Example."""

    path: Path
    available: list[str]
    prompt_field: str
    cot_field: str
    answer_field: str | None
    cot_steps: StepMode
    prompt_template: str | None = None
    chat: bool = False
    extractor: AnswerExtractor | None = None

    def example(self, row: int, question: Any, cot: Any, answer: Any) -> Example | str:
        """The row's Example, or the reason it is dropped; raises DataError for a bad value."""
        question = self._question(row, question)
        cot = self._cot(row, cot)
        if not question:
            return "blank prompt"
        if not cot:
            return "blank chain of thought"
        if self.answer_field is None:
            target, canonical = cot, _final_answer(cot, self.extractor)
        else:
            raw = self._answer(row, answer)
            target = f"{cot}\n#### {raw}"
            canonical = self._canonical(raw) if raw else None
        if not canonical:
            return (
                "no final answer"
                if self.extractor is None
                else (f"no final answer of type {self.extractor.answer_type}")
            )
        steps = count_steps(cot, self.cot_steps)
        if self.chat:
            return Example(question, target, canonical, steps)
        return Example(format_prompt(question), f" {target}", canonical, steps)

    def _canonical(self, raw: str) -> str | None:
        return normalise_answer(raw) if self.extractor is None else self.extractor.normalise(raw)

    def _question(self, row: int, value: Any) -> str:
        if self.prompt_template is None:
            return self._text(row, "prompt_field", self.prompt_field, value)
        parts = {}
        for name, v in value.items():
            key = "prompt_template"
            self._not_null(row, key, name, v)
            if isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v):
                parts[name] = " ".join(str(x).strip() for x in v)
            elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
                parts[name] = str(v).strip()
            else:
                self._bad_type(row, key, name, v, "text, a number or a list of them")
        return self.prompt_template.format(**parts).strip()

    def _text(self, row: int, key: str, field: str, value: Any) -> str:
        self._not_null(row, key, field, value)
        if not isinstance(value, str):
            self._bad_type(row, key, field, value, "text")
        return value.strip()

    def _cot(self, row: int, value: Any) -> str:
        """The CoT as stripped text; a list of strings becomes one step per line."""
        self._not_null(row, "cot_field", self.cot_field, value)
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(v.strip() for v in value if v.strip())
        self._bad_type(row, "cot_field", self.cot_field, value, "text or a list of strings")

    def _answer(self, row: int, value: Any) -> str:
        """The answer as written after '#### ' in the target."""
        assert self.answer_field is not None
        self._not_null(row, "answer_field", self.answer_field, value)
        if isinstance(value, str):
            return value.strip()
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)) and math.isfinite(value):
            return normalise_answer(str(value))  # 8.0 -> "8"
        self._bad_type(row, "answer_field", self.answer_field, value, "text, a number or a boolean")

    def _not_null(self, row: int, key: str, field: str, value: Any) -> None:
        if value is None:
            raise DataError(
                f"{self.path}: row {row} (0-based) has no value (missing or null) for field {field!r} (set by {key}); "
                f"available fields: {', '.join(self.available)}. Fill or remove that row, or set "
                f"{key} to another field."
            )

    def _bad_type(self, row: int, key: str, field: str, value: Any, wanted: str) -> NoReturn:
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise DataError(
            f"{self.path}: row {row} (0-based), field {field!r} (set by {key}) holds a "
            f"{type(value).__name__} ({shown}), not {wanted}; available fields: "
            f"{', '.join(self.available)}. Set {key} to a field holding {wanted}."
        )


def _final_answer(cot: str, extractor: AnswerExtractor | None = None) -> str | None:
    """The answer on the CoT's final '#### N' line, or None if the last line is not one."""
    lines = [line for line in cot.splitlines() if line.strip()]
    if not lines or not _ANSWER_LINE_RE.match(lines[-1]):
        return None
    if extractor is None:
        return extract_answer(lines[-1])
    return AnswerExtractor(extractor.answer_type).extract(lines[-1])  # never a fallback
