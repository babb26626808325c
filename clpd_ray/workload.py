"""Everything a run trains and measures on, built once on the driver.

A :class:`Workload` holds the shared tokenizer, the training examples with their difficulty
scores, the held-out evaluation set, a small probe set per curriculum stage, and the teacher
ladder. The embedded synthetic task is used unless ``data.path`` names a dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from clpd_ray.config import Config, default_cache_dir
from clpd_ray.curriculum.difficulty import (
    length_scores,
    rank_fusion,
    step_scores,
    student_loss_scores,
)
from clpd_ray.data.batching import fit_examples, tokenize_rows
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.loaders import hold_out, load_examples, train_eval_split
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.task import TooFewProblems, held_out_split, synthetic_task
from clpd_ray.data.tokenizer import build_char_tokenizer, load_tokenizer
from clpd_ray.distill.ladder import LadderEntry, ensure_ladder
from clpd_ray.distill.models import (
    load_causal_lm,
    required_tokenizer_source,
)
from clpd_ray.errors import ConfigError, DataError

__all__ = ["Workload", "build_workload", "difficulty_scores", "load_data", "stage_of"]

_log = logging.getLogger(__name__)


@dataclass
class Workload:
    tokenizer: PreTrainedTokenizerBase
    tokenizer_dir: Path  # save_pretrained directory every actor loads the tokenizer from
    train: list[Example]
    scores: np.ndarray  # (N,) difficulty of each training example, higher = harder
    eval: list[Example]
    probe_pool: list[Example]  # held-out examples the probes are drawn from
    probe_scores: np.ndarray  # (P,) difficulty of each probe-pool example, same scorer
    ladder: list[LadderEntry]
    max_new_tokens: int  # generation budget for evaluation
    # How prompts and targets become text (plain or chat template); every encode/generate of the
    # run passes it, so training, probes, evaluation and sequence-level KD read the same text.
    prompt_format: PromptFormat = field(default_factory=PromptFormat)
    extractor: AnswerExtractor = field(default_factory=AnswerExtractor)  # scores generations
    # train.max_length (None: no limit); train and probe rows already fit it (see length_stats).
    max_length: int | None = None
    # {"max_length", "overlong", "truncated", "dropped", "longest", "by_split": {...}}: what
    # train.max_length did to the rows, for summary.json.
    length_stats: dict[str, Any] = field(default_factory=dict)
    # {"train_rows", "eval_rows", "probe_rows", "duplicates_dropped", ...}: how the rows were split.
    data_stats: dict[str, Any] = field(default_factory=dict)


_Split = tuple[list[Example], list[Example], list[Example], dict[str, Any]]


def _embedded(config: Config) -> _Split:
    """(train, eval, probe pool, stats) of the embedded task.

    The training rows are drawn as always; evaluation and probe problems are then drawn without
    replacement from the problems training does not hold (data/task.py ``held_out_split``), so
    they are disjoint from training and from each other. A difficulty with too few unseen
    problems (k=1 has 300, all in a 20,000-row training set) is "seen": it is left out of
    evaluation and probes, and ``stats["seen_difficulties"]`` (summary.json ``data``) names it.
    """
    t = config.task
    task = synthetic_task(t.name)
    train = task.generate(t.train_size, t.max_difficulty, config.seed, "train")
    try:
        held = held_out_split(
            train, t.max_difficulty, t.eval_size, max(60, t.eval_size // 2), config.seed, task=task
        )
    except TooFewProblems as err:
        raise ConfigError(
            f"task: {err}; lower task.train_size (now {t.train_size}) or task.eval_size (now "
            f"{t.eval_size}), or raise task.max_difficulty (now {t.max_difficulty})"
        ) from None
    stats = {
        "train_rows": len(train),
        "eval_rows": len(held.eval),
        "probe_rows": len(held.probe),
        "held_out_difficulties": list(held.levels),
        "seen_difficulties": list(held.seen),  # every problem of these levels is in training
        "unseen_problems": {str(k): n for k, n in held.unseen.items()},
    }
    return train, held.eval, held.probe, stats


def _question_key(e: Example) -> str:
    return " ".join(e.prompt.split()).casefold()


def _external(config: Config) -> _Split:
    """(train, eval, probe pool, stats) of an external dataset.

    Evaluation rows come from ``data.eval_path`` (else ``eval_fraction`` of ``data.path``) and
    serve only evaluation; ``data.probe_rows`` training-side rows are held out as the probe pool.
    Training rows (and probe rows) whose question is also an evaluation or probe question are
    dropped and counted; ``max_eval_rows`` / ``max_train_rows`` keep the first rows.
    """
    d = config.data
    assert d.path is not None
    extractor = AnswerExtractor.from_config(config)

    def load(path: str) -> list[Example]:
        try:
            return load_examples(
                path,
                prompt_field=d.prompt_field,
                cot_field=d.cot_field,
                answer_field=d.answer_field,
                cot_steps=d.cot_steps,
                prompt_template=d.prompt_template,
                chat=d.chat_template,
                extractor=extractor,
            )
        except DataError as err:
            if d.preset is None or "has no field" not in str(err):
                raise
            raise DataError(
                f"{err} (data.preset: {d.preset} maps the fields of the {d.preset} files; is "
                f"{path} a {d.preset} file? Fix data.preset, or override the field keys.)"
            ) from None

    examples = load(d.path)
    if d.eval_path:
        held_out, rest = load(d.eval_path), examples
    else:
        rest, held_out = train_eval_split(examples, d.eval_fraction, config.seed)
    if d.max_eval_rows is not None:
        held_out = held_out[: d.max_eval_rows]
    n_probe = min(d.probe_rows, len(rest) // 2)
    if n_probe < d.probe_rows:
        _log.warning(
            "data.probe_rows=%d but %s has only %d training-side rows: holding out %d for probes "
            "(at most half)",
            d.probe_rows,
            d.path,
            len(rest),
            n_probe,
        )
    train, probe = hold_out(rest, n_probe, config.seed)
    eval_keys = {_question_key(e) for e in held_out}
    probe_kept = [e for e in probe if _question_key(e) not in eval_keys]
    held_keys = eval_keys | {_question_key(e) for e in probe_kept}
    train_kept = [e for e in train if _question_key(e) not in held_keys]
    stats: dict[str, Any] = {
        "duplicates_dropped": len(train) - len(train_kept),  # training rows asked again held out
        "probe_duplicates_dropped": len(probe) - len(probe_kept),
    }
    if d.max_train_rows is not None:
        train_kept = train_kept[: d.max_train_rows]
    if not train_kept:
        raise DataError(
            f"{d.path}: no training rows are left after holding out {len(probe)} probe rows and "
            f"dropping {stats['duplicates_dropped']} rows whose question is an evaluation or probe "
            "question; give more rows, or lower data.probe_rows"
        )
    if not probe_kept:  # every probe question is an eval question: probe on eval rows instead
        probe_kept = held_out[: max(1, n_probe)]
    stats.update(train_rows=len(train_kept), eval_rows=len(held_out), probe_rows=len(probe_kept))
    return train_kept, held_out, probe_kept, stats


def _fit_lengths(
    config: Config,
    tok: PreTrainedTokenizerBase,
    fmt: PromptFormat,
    train: list[Example],
    probe: list[Example],
    held_out: list[Example],
) -> tuple[list[Example], list[Example], dict[str, Any]]:
    """Train and probe rows fitted to ``train.max_length``, and what that did (for summary.json).

    Evaluation rows are generated from their prompts, so they are only counted, never cut.
    Without a limit nothing is tokenized here (the "longest" figures are then None).
    """
    t = config.train
    fitted_train, st_train = fit_examples(tok, train, t.max_length, fmt, t.overlong)
    fitted_probe, st_probe = fit_examples(tok, probe, t.max_length, fmt, t.overlong)
    eval_rows = tokenize_rows(tok, held_out, fmt) if t.max_length is not None else []
    eval_over = sum(len(r) > (t.max_length or 0) for r, _ in eval_rows)
    if not fitted_train:
        raise DataError(
            f"all {len(train)} training rows are longer than train.max_length={t.max_length} "
            f"tokens (the longest has {st_train.longest}); raise train.max_length or set "
            "train.overlong: truncate"
        )
    if not fitted_probe:
        fitted_probe = fitted_train[: max(1, len(probe))]
    stats = {
        "max_length": t.max_length,
        "overlong": t.overlong,
        "truncated": st_train.truncated + st_probe.truncated,
        "dropped": st_train.dropped + st_probe.dropped,
        "longest": max(st_train.longest or 0, st_probe.longest or 0) or None,
        "by_split": {
            "train": {"truncated": st_train.truncated, "dropped": st_train.dropped},
            "probe": {"truncated": st_probe.truncated, "dropped": st_probe.dropped},
            "eval": {
                "longer_than_max_length": int(eval_over),
                "longest": max((len(r) for r, _ in eval_rows), default=None),
            },
        },
    }
    return fitted_train, fitted_probe, stats


def load_data(config: Config) -> _Split:
    """(train, eval, probe pool, stats) as a run gets them, before lengths are fitted: the data
    files read and every row mapped (``clpd validate`` checks them with this)."""
    return _external(config) if config.data.path else _embedded(config)


def _tokenizer(config: Config) -> tuple[PreTrainedTokenizerBase, Path]:
    """The run's shared tokenizer and a local directory holding it (see
    :func:`~clpd_ray.distill.models.shared_tokenizer_source` for where it comes from)."""
    found = required_tokenizer_source(config)
    if found is None:
        tok: PreTrainedTokenizerBase = build_char_tokenizer()
        path = default_cache_dir(config) / "tokenizer-embedded"
        if not (path / "tokenizer.json").is_file():
            tok.save_pretrained(path)
        return tok, path
    key, source = found
    tok = load_tokenizer(source)
    if key != "student.tokenizer":
        return tok, Path(source)  # a model directory (or hub id): the actors load it from there
    # A tokenizer for built models: a tokenizer-only copy, addressed by its content, that the
    # run publishes to its storage for the actors (models_store.actor_sources).
    return tok, _tokenizer_copy(config, tok)


def _tokenizer_copy(config: Config, tok: PreTrainedTokenizerBase) -> Path:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    extra = json.dumps([tok.chat_template, tok.special_tokens_map], sort_keys=True, default=str)
    digest = hashlib.sha256((text + extra).encode()).hexdigest()[:16]
    path = default_cache_dir(config) / "tokenizers" / digest
    if not (path / "tokenizer_config.json").is_file():
        tmp = path.with_name(f".{digest}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tok.save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process saved the same tokenizer first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def difficulty_scores(
    config: Config, examples: list[Example], tok: PreTrainedTokenizerBase, ladder: list[LadderEntry]
) -> np.ndarray:
    """The configured difficulty score of each example (higher = harder)."""
    kind = config.curriculum.scorer
    if kind == "steps":
        return step_scores(examples)
    if kind == "length":
        return length_scores(examples, tok)
    # Student-loss signals: the weakest teacher stands in for a student that can already read
    # the task (a randomly initialised student's loss says nothing about difficulty).
    proxy = load_causal_lm(ladder[0].path)
    loss = student_loss_scores(proxy, tok, examples, fmt=PromptFormat.from_config(config))
    return loss if kind == "student_loss" else rank_fusion(step_scores(examples), loss)


def build_workload(config: Config, *, progress: bool = True) -> Workload:
    """Load or generate the data, train or load the teacher ladder, score difficulty."""
    train, held_out, probe_pool, data_stats = load_data(config)
    tok, tok_dir = _tokenizer(config)
    fmt = PromptFormat.from_config(config)
    fmt.check(tok, source=f"the run's tokenizer ({tok_dir})")
    train, probe_pool, length_stats = _fit_lengths(config, tok, fmt, train, probe_pool, held_out)
    data_stats.update(train_rows=len(train), probe_rows=len(probe_pool))
    # Teachers given by path are scored on their own actors (GPUs) at the end of the run, not
    # here on the driver, which may have no GPU (`clpd ladder` scores them here, on request).
    ladder = ensure_ladder(config, tok, train, held_out, progress=progress, score_paths=False)
    rows = tokenize_rows(tok, held_out, fmt)
    return Workload(
        tokenizer=tok,
        tokenizer_dir=tok_dir,
        train=train,
        scores=difficulty_scores(config, train, tok, ladder),
        eval=held_out,
        probe_pool=probe_pool,
        probe_scores=difficulty_scores(config, probe_pool, tok, ladder),
        ladder=ladder,
        # The longest reference answer (target + end token) plus a margin of one token.
        max_new_tokens=max(len(ids) - n for ids, n in rows) + 1,
        prompt_format=fmt,
        extractor=AnswerExtractor.from_config(config),
        max_length=config.train.max_length,
        length_stats=length_stats,
        data_stats=data_stats,
    )


def stage_of(scores: np.ndarray, stages: list[np.ndarray], train_scores: np.ndarray) -> np.ndarray:
    """The stage each of ``scores`` belongs to, by the highest training score of each stage."""
    edges = np.array([train_scores[s].max() for s in stages[:-1]])
    return np.searchsorted(edges, scores, side="left").astype(np.int64)
