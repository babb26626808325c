"""Sequence-level KD: a teacher's generated chains of thought, checked and re-tokenized for the student.

The teacher needs no vocabulary in common with the student: it generates TEXT with its own
tokenizer and prompt format (runtime/actors/teacher.py), and the text is tokenized again with
the student's tokenizer, so the student's training ids decode to the teacher's text::

    Batch (prompts, gold CoTs + answers, example ids)
      │  ChainCache: a greedy chain per (teacher, example id, decoding settings) is made once
      ▼
    generate_texts(teacher model, TEACHER tokenizer, fmt)  ──▶  chains (text)
      │  verify: keep a chain only if its extracted answer equals the gold one
      │          rejected ──▶ on_reject=gold: the row trains on the gold CoT
      │                       on_reject=skip: the row is dropped
      ▼
    encode_examples(STUDENT tokenizer, prompt + chain, fmt)  ──▶  GeneratedBatch.batch

A batch left with no rows (every chain rejected with on_reject=skip, or too long with
train.overlong=drop) trains on its gold CoTs instead: every step updates the student, so the
step count, learning-rate schedule and checkpoints stay those of token-level KD.

Greedy chains are deterministic, so they are cached; sampled chains are not (a replayed step
samples again with the same seed, :func:`chain_seed` of the run seed and the step, and gets the
same chains on the same hardware).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from transformers import PreTrainedTokenizerBase

from clpd_ray.data.batching import Encoded, encode_examples, tokenize_rows
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.messages import Batch, GeneratedBatch

__all__ = [
    "ChainCache",
    "SequenceSettings",
    "chain_seed",
    "chains_to_batch",
    "same_vocab",
    "settings_per_teacher",
    "summarise_counts",
]


def chain_seed(run_seed: int, step: int) -> int:
    """The sampling seed of step ``step``: a pure function of (run seed, step), in [0, 2**32)."""
    return int(np.random.SeedSequence([run_seed, step, 0x5E0]).generate_state(1)[0])


@dataclass(frozen=True)
class SequenceSettings:
    """How a teacher makes and checks chains (built once on the driver from ``distill.*``)."""

    max_new_tokens: int  # in the teacher's tokens
    decoding: Literal["greedy", "sample"] = "greedy"
    temperature: float = 1.0  # sampling temperature (decoding=sample only)
    verify: bool = False
    on_reject: Literal["gold", "skip"] = "gold"
    seed: int = 0  # the run seed; step j samples with chain_seed(seed, j)
    fmt: PromptFormat = field(default_factory=PromptFormat)
    extractor: AnswerExtractor = field(default_factory=AnswerExtractor)
    max_length: int | None = None  # train.max_length, in the student's tokens
    overlong: Literal["truncate", "drop"] = "truncate"

    @classmethod
    def from_config(cls, config: Any, default_max_new_tokens: int) -> SequenceSettings:
        """``distill.max_new_tokens`` unset: ``default_max_new_tokens`` (the workload's budget)."""
        d = config.distill
        return cls(
            max_new_tokens=d.max_new_tokens or default_max_new_tokens,
            decoding=d.decoding,
            temperature=d.sample_temperature,
            verify=d.verify,
            on_reject=d.on_reject,
            seed=config.seed,
            fmt=PromptFormat.from_config(config),
            extractor=AnswerExtractor.from_config(config),
            max_length=config.train.max_length,
            overlong=config.train.overlong,
        )

    @property
    def sample(self) -> bool:
        return self.decoding == "sample"

    def cache_key(self) -> tuple | None:
        """What determines a greedy chain besides the teacher and the prompt; None: no caching
        (sampled chains differ from step to step by design)."""
        if self.sample:
            return None
        return ("greedy", self.max_new_tokens, self.fmt)


class ChainCache:
    """Greedy chains by (teacher, example id, decoding settings), so that replayed or repeated
    examples are not generated again. Holds text only (a few hundred bytes per example)."""

    def __init__(self) -> None:
        self._chains: dict[tuple, str] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._chains)

    def lookup(
        self, teacher: str, example_ids: Sequence[int], settings: SequenceSettings
    ) -> list[str | None]:
        """The cached chain of each example, None where there is none (or sampling is on)."""
        key = settings.cache_key()
        if key is None:
            return [None] * len(example_ids)
        out = [self._chains.get((teacher, int(i), key)) for i in example_ids]
        self.hits += sum(c is not None for c in out)
        return out

    def store(
        self,
        teacher: str,
        example_ids: Sequence[int],
        chains: Sequence[str],
        settings: SequenceSettings,
    ) -> None:
        key = settings.cache_key()
        if key is None:
            return
        for i, c in zip(example_ids, chains, strict=True):
            self._chains[(teacher, int(i), key)] = c


def chains_to_batch(
    teacher: str,
    batch: Batch,
    chains: Sequence[str],
    student_tokenizer: PreTrainedTokenizerBase,
    settings: SequenceSettings,
    *,
    cached: int = 0,
    latency_s: float = 0.0,
) -> GeneratedBatch:
    """Verify the teacher's ``chains`` (one per row of ``batch``) and encode the rows the student
    trains on with ``student_tokenizer``. See the module docstring for the rules; a chain longer
    than ``train.max_length`` student tokens is truncated or dropped as ``train.overlong`` says.

    Every input row ends up in exactly one of: trained on the teacher's chain (``accepted``),
    trained on the gold CoT (``gold_rows``), left out (``dropped``)."""
    n = len(batch.prompts)
    if len(chains) != n:
        raise ValueError(f"{len(chains)} chains for a batch of {n} prompts")
    has_gold = len(batch.answers) == n and len(batch.targets) == n
    if settings.verify and not has_gold:
        raise ValueError("distill.verify needs the batch's gold answers and targets")
    # Leading space kept: plain-format targets start with one (" Natalia ...", after "Answer:").
    texts = [c.rstrip() for c in chains]
    correct = (
        [settings.extractor.matches(t, a) for t, a in zip(texts, batch.answers, strict=True)]
        if has_gold
        else [False] * n
    )
    passed = correct if settings.verify else [True] * n
    rows: list[tuple[int, str, bool]] = []  # (row of batch, target text, the teacher's chain?)
    for i in range(n):
        if passed[i]:
            rows.append((i, texts[i], True))
        elif settings.on_reject == "gold":
            rows.append((i, batch.targets[i], False))
    enc, rows = _encode(rows, batch, student_tokenizer, settings)
    if not rows:
        # Every chain rejected (on_reject=skip) or too long (overlong=drop): train on the gold
        # CoTs, which the workload already fitted to max_length, never on an empty batch.
        enc, rows = _encode(
            [(i, t, False) for i, t in enumerate(batch.targets)], batch, student_tokenizer, settings
        )
    keep = [i for i, _, _ in rows]
    out = Batch(
        step=batch.step,
        stage=batch.stage,
        input_ids=enc.input_ids,
        attention_mask=enc.attention_mask,
        loss_mask=enc.loss_mask,
        example_ids=np.asarray(batch.example_ids)[keep],
        prompts=tuple(batch.prompts[i] for i in keep),
        targets=tuple(t for _, t, _ in rows),
        answers=tuple(_at(batch.answers, i) for i in keep),
    )
    accepted = sum(own for _, _, own in rows)
    return GeneratedBatch(
        teacher=teacher,
        batch=out,
        latency_s=latency_s,
        generated=n,
        cached=cached,
        correct=sum(correct),
        accepted=accepted,
        gold_rows=len(rows) - accepted,
        dropped=n - len(rows),
    )


def _encode(
    rows: list[tuple[int, str, bool]],
    batch: Batch,
    tokenizer: PreTrainedTokenizerBase,
    settings: SequenceSettings,
) -> tuple[Encoded, list[tuple[int, str, bool]]]:
    """The rows encoded with the student's tokenizer, and the rows that were (overlong=drop)."""
    examples = [Example(batch.prompts[i], t, _at(batch.answers, i), 0) for i, t, _ in rows]
    enc = encode_examples(
        tokenizer,
        examples,
        max_length=settings.max_length,
        fmt=settings.fmt,
        overlong=settings.overlong,
    )
    kept = range(len(rows)) if enc.kept is None else [int(k) for k in enc.kept]
    return enc, [rows[k] for k in kept]


def settings_per_teacher(
    config: Any,
    student_tokenizer: PreTrainedTokenizerBase,
    teacher_tokenizers: Sequence[PreTrainedTokenizerBase],
    references: Sequence[Example],
    default_max_new_tokens: int,
) -> list[SequenceSettings]:
    """One :class:`SequenceSettings` per teacher. With ``distill.max_new_tokens`` unset, a
    teacher that shares the student's tokenizer gets ``default_max_new_tokens`` (the workload's
    budget: the longest reference answer in the student's tokens, plus one); a teacher with
    another tokenizer gets the same measured in its own tokens, since a finer tokenizer needs
    more of them for the same text and a budget cut short loses the answer line."""
    base = SequenceSettings.from_config(config, default_max_new_tokens)
    out = []
    for tok in teacher_tokenizers:
        if config.distill.max_new_tokens is not None or same_vocab(student_tokenizer, tok):
            out.append(base)
            continue
        rows = tokenize_rows(tok, references, base.fmt)
        budget = max((len(ids) - n for ids, n in rows), default=default_max_new_tokens) + 1
        out.append(replace(base, max_new_tokens=budget))
    return out


def _at(values: Sequence[str], i: int) -> str:
    return values[i] if i < len(values) else ""


def same_vocab(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether two tokenizers map every token to the same id (token-level targets transfer)."""
    return a is b or a.get_vocab() == b.get_vocab()


def summarise_counts(counts: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per-teacher totals of :meth:`GeneratedBatch.counts` rows, with the acceptance rate
    (accepted / generated: the share of rows that trained on the teacher's own chain)."""
    out: dict[str, dict[str, Any]] = {}
    for c in counts:
        t = out.setdefault(
            c["teacher"],
            {k: 0 for k in ("generated", "cached", "correct", "accepted", "gold_rows", "dropped")},
        )
        for k in t:
            t[k] += int(c[k])
    for t in out.values():
        t["rate"] = round(t["accepted"] / t["generated"], 4) if t["generated"] else None
    return out
