"""Messages exchanged between the controller and the actors.

All are small frozen dataclasses holding numpy arrays (numpy crosses Ray's object store
zero-copy; torch tensors would be pickled). Shapes use B = batch, T = sequence length,
K = top-k size.

    controller ──Batch──▶ teacher ──TeacherTargets──▶ student ──StepResult──▶ controller
        │                                                                        │
        └──────────── Observation ──▶ scheduler ──Decision──▶ controller ◀───────┘
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "Batch",
    "Decision",
    "GeneratedBatch",
    "Observation",
    "ProbeResult",
    "StepResult",
    "TeacherTargets",
]


@dataclass(frozen=True)
class Batch:
    """One training batch, already tokenized with the shared tokenizer.

    ``loss_mask[b, t]`` is True where the prediction at position t (of token t+1) is scored:
    chain-of-thought and answer tokens, never prompt or padding.
    """

    step: int
    stage: int
    input_ids: np.ndarray  # (B, T) int64
    attention_mask: np.ndarray  # (B, T) int64, 1 = real token
    loss_mask: np.ndarray  # (B, T) bool
    example_ids: np.ndarray  # (B,) int64, rows of the training set
    prompts: tuple[str, ...] = ()  # for sequence-level KD (teacher generates the CoT)

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass(frozen=True)
class TeacherTargets:
    """Top-k distillation targets from one teacher for one batch.

    ``logprobs`` are log-softmax(teacher_logits / temperature) at the top-k ids, computed in float32.
    With k equal to the vocabulary size the targets are exact (full distillation).
    """

    teacher: str
    step: int
    logprobs: np.ndarray  # (B, T, K) float32
    ids: np.ndarray  # (B, T, K) int64
    temperature: float
    latency_s: float = 0.0


@dataclass(frozen=True)
class GeneratedBatch:
    """Sequence-level KD: a teacher's generated chains of thought, retokenized as a training batch."""

    teacher: str
    batch: Batch
    latency_s: float = 0.0


@dataclass(frozen=True)
class StepResult:
    """What the student reports after one optimizer step."""

    step: int
    loss: float
    kd_loss: float
    ce_loss: float
    lr: float
    tokens: int
    busy_s: float


@dataclass(frozen=True)
class ProbeResult:
    """The student measured on one stage's small probe set."""

    stage: int
    loss: float  # mean token NLL of the reference CoT + answer
    accuracy: float  # exact-match answer accuracy, greedy decoding
    kl_to_teacher: tuple[float, ...]  # KL(teacher || student) per teacher, weakest first


@dataclass(frozen=True)
class Observation:
    """Everything a scheduling policy may look at when it decides.

    ``probes`` holds the latest probe results, one per stage (empty before the first probe);
    ``teacher_accuracy[i][s]`` is teacher i's accuracy on stage s's probe set.
    """

    step: int
    total_steps: int
    stage: int
    num_stages: int
    teacher: int
    num_teachers: int
    steps_in_stage: int
    recent_loss: float | None = None
    loss_history: tuple[float, ...] = ()
    probe_step: int | None = None
    probes: tuple[ProbeResult, ...] = ()
    teacher_accuracy: tuple[tuple[float, ...], ...] = ()


@dataclass(frozen=True)
class Decision:
    """What the scheduler wants from the next step on.

    ``teacher`` indexes the ladder, weakest = 0. ``replay`` is the share of each batch drawn from
    earlier stages; ``teacher_mix`` optional weights over teachers (None = only ``teacher``).
    """

    stage: int
    teacher: int
    reason: str
    replay: float | None = None
    teacher_mix: tuple[float, ...] | None = field(default=None)
