"""Everything a run trains and measures on, built once on the driver.

A :class:`Workload` holds the shared tokenizer, the training examples with their difficulty
scores, the held-out evaluation set, a small probe set per curriculum stage, and the teacher
ladder. The embedded synthetic task is used unless ``data.path`` names a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from clpd_ray.config import Config, default_cache_dir
from clpd_ray.curriculum.difficulty import (
    length_scores,
    rank_fusion,
    step_scores,
    student_loss_scores,
)
from clpd_ray.data.example import Example
from clpd_ray.data.loaders import load_examples, train_eval_split
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer, load_tokenizer
from clpd_ray.distill.ladder import LadderEntry, ensure_ladder
from clpd_ray.distill.models import load_causal_lm
from clpd_ray.errors import ConfigError

__all__ = ["Workload", "build_workload", "difficulty_scores", "stage_of"]


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


def _embedded(config: Config) -> tuple[list[Example], list[Example], list[Example]]:
    t = config.task
    return (
        generate_examples(t.train_size, t.max_difficulty, config.seed, "train"),
        generate_examples(t.eval_size, t.max_difficulty, config.seed, "eval"),
        generate_examples(max(60, t.eval_size // 2), t.max_difficulty, config.seed, "probe"),
    )


def _external(config: Config) -> tuple[list[Example], list[Example], list[Example]]:
    d = config.data
    assert d.path is not None

    def load(path: str) -> list[Example]:
        return load_examples(
            path,
            prompt_field=d.prompt_field,
            cot_field=d.cot_field,
            answer_field=d.answer_field,
            cot_steps=d.cot_steps,
        )

    examples = load(d.path)
    if d.eval_path:
        held_out = load(d.eval_path)
        train = examples
    else:
        train, held_out = train_eval_split(examples, d.eval_fraction, config.seed)
    half = len(held_out) // 2
    return train, held_out[half:] or held_out, held_out[:half] or held_out


def _tokenizer(config: Config) -> tuple[PreTrainedTokenizerBase, Path]:
    if config.data.path is None:
        tok = build_char_tokenizer()
        path = default_cache_dir(config) / "tokenizer-embedded"
        if not (path / "tokenizer.json").is_file():
            tok.save_pretrained(path)
        return tok, path
    # External data: the student's tokenizer is the shared one (checked against every teacher).
    source = config.student.path or config.teachers.ladder[-1].path
    if source is None:
        raise ConfigError(
            "data.path is set but neither student.path nor the teachers' paths are: an external "
            "dataset needs real models (and their tokenizer); set student.path or teachers.ladder[*].path"
        )
    return load_tokenizer(source), Path(source)


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
    loss = student_loss_scores(proxy, tok, examples)
    return loss if kind == "student_loss" else rank_fusion(step_scores(examples), loss)


def build_workload(config: Config, *, progress: bool = True) -> Workload:
    """Load or generate the data, train or load the teacher ladder, score difficulty."""
    train, held_out, probe_pool = _external(config) if config.data.path else _embedded(config)
    tok, tok_dir = _tokenizer(config)
    ladder = ensure_ladder(config, tok, train, held_out, progress=progress)
    targets = tok([e.target for e in held_out], add_special_tokens=False)["input_ids"]
    return Workload(
        tokenizer=tok,
        tokenizer_dir=tok_dir,
        train=train,
        scores=difficulty_scores(config, train, tok, ladder),
        eval=held_out,
        probe_pool=probe_pool,
        probe_scores=difficulty_scores(config, probe_pool, tok, ladder),
        ladder=ladder,
        max_new_tokens=max(len(t) for t in targets) + 2,
    )


def stage_of(scores: np.ndarray, stages: list[np.ndarray], train_scores: np.ndarray) -> np.ndarray:
    """The stage each of ``scores`` belongs to, by the highest training score of each stage."""
    edges = np.array([train_scores[s].max() for s in stages[:-1]])
    return np.searchsorted(edges, scores, side="left").astype(np.int64)
