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
    # Sequence-level KD only (the teacher generates the CoT; distill/sequence.py): each row's
    # prompt, gold CoT + answer line, and gold answer (for distill.verify and on_reject=gold).
    prompts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    answers: tuple[str, ...] = ()

    @property
    def num_target_tokens(self) -> int:
        return int(self.loss_mask.sum())


@dataclass(frozen=True)
class TeacherTargets:
    """Top-k distillation targets from one teacher for one batch, at its scored positions only.

    Compact layout (what teachers send): row n is the n-th True entry of ``batch.loss_mask`` in
    row-major order (``np.nonzero`` / torch boolean indexing), so N = ``batch.num_target_tokens``
    and prompt or padding positions cost nothing. ``logprobs`` are
    log-softmax(teacher_logits / temperature) at the top-k ids, computed in float32 and stored in
    ``teachers.target_dtype``: float32, float16, or bfloat16 carried as its raw bits in a uint16
    array (numpy has no bfloat16), so always read them through :meth:`logprobs_float32` or
    :meth:`at_positions`. With k equal to the vocabulary size the targets are exact.

    The dense layout, (B, T, K) at every position, is still accepted by :meth:`at_positions`.
    """

    teacher: str
    step: int
    logprobs: np.ndarray  # (N, K) float16 | float32 | uint16 (bfloat16 bits); dense: (B, T, K)
    ids: np.ndarray  # (N, K) int32; dense: (B, T, K)
    temperature: float
    latency_s: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of payload (log-probabilities + ids) this message carries."""
        return int(self.logprobs.nbytes + self.ids.nbytes)

    def logprobs_float32(self) -> np.ndarray:
        """``logprobs`` widened to float32 (exact for float16 and bfloat16), same shape."""
        lp = self.logprobs
        if lp.dtype == np.uint16:  # bfloat16 bits: the top half of a float32
            return (lp.astype(np.uint32) << 16).view(np.float32)
        return lp.astype(np.float32, copy=False)

    def at_positions(self, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logprobs float32 (N, K), ids int64 (N, K)) at the scored positions of ``loss_mask``.

        Accepts both layouts; raises ValueError when the targets do not fit the mask (a teacher
        answered for another batch).
        """
        mask = np.asarray(loss_mask, dtype=bool)
        lp, ids = self.logprobs_float32(), np.asarray(self.ids)
        if lp.ndim == 3 and lp.shape[:2] == mask.shape:  # dense: select the scored positions
            lp, ids = lp[mask], ids[mask]
        n = int(mask.sum())
        if lp.ndim != 2 or lp.shape != ids.shape or lp.shape[0] != n:
            raise ValueError(
                f"teacher {self.teacher!r} sent targets of shape {self.logprobs.shape} (ids "
                f"{self.ids.shape}) for step {self.step}, but the batch has {n} scored positions "
                f"in a {mask.shape} mask; compact targets need ({n}, K)"
            )
        return lp, ids.astype(np.int64, copy=False)


@dataclass(frozen=True)
class GeneratedBatch:
    """Sequence-level KD: a teacher's generated chains of thought, retokenized as a training batch."""

    teacher: str
    batch: Batch  # in the STUDENT's tokens, whatever the teacher's tokenizer
    latency_s: float = 0.0
    generated: int = 0  # rows the teacher gave a chain for (cache hits included)
    cached: int = 0  # of those, chains answered from the teacher's cache
    correct: int = 0  # chains whose extracted answer equals the gold one
    accepted: int = 0  # chains the student trains on (all of them unless distill.verify)
    gold_rows: int = 0  # rows that train on the gold CoT instead (rejected chains)
    dropped: int = 0  # rows left out (rejected with distill.on_reject=skip)

    def counts(self) -> dict[str, int | str]:
        """The counters above and the teacher's name (summary.json ``sequence_kd``)."""
        keys = ("generated", "cached", "correct", "accepted", "gold_rows", "dropped")
        return {"teacher": self.teacher, **{k: getattr(self, k) for k in keys}}


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
