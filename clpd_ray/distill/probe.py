"""Measure the student on the per-stage probe sets: what probe-reading policies observe.

A probe is a pure function of a model and the probe sets, so the student actor runs it on a
device-local snapshot of its own weights (runtime/actors/student.py) and this module is tested
without Ray. Each stage's probe set gives a :class:`~clpd_ray.messages.ProbeResult`: the
student's mean token NLL of the reference chains, its exact-match accuracy (greedy decoding) and
KL(teacher || student) to every teacher that scored the same set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clpd_ray.data.batching import Encoded
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.distill.losses import sparse_kd_loss_flat
from clpd_ray.distill.training import evaluate_accuracy, masked_nll, to_torch
from clpd_ray.messages import ProbeResult, TeacherTargets

__all__ = ["ProbeSet", "run_probes", "teacher_kl"]


@dataclass(frozen=True)
class ProbeSet:
    """One stage's probe examples, encoded for the student, and each teacher's targets on them
    (weakest teacher first; empty when teachers cannot score the student's tokens)."""

    stage: int
    examples: tuple[Example, ...]
    encoded: Encoded
    teacher_targets: tuple[TeacherTargets, ...] = ()


def teacher_kl(logits: torch.Tensor, loss_mask: torch.Tensor, targets: TeacherTargets) -> float:
    """Forward KL(teacher || student) over the scored positions of one probe batch.

    ``logits`` (B, T, V) are the student's; ``targets`` hold the teacher's top-k either per
    position (B, T, K) or only at the scored positions in row-major order (N, K).
    """
    logprobs, ids = targets.at_positions(loss_mask.cpu().numpy())  # (N, K) float32, int64
    kl = sparse_kd_loss_flat(
        logits[loss_mask],
        torch.as_tensor(logprobs, device=logits.device),
        torch.as_tensor(ids, device=logits.device),
        "fkl",
        temperature=targets.temperature,
    )
    return float(kl)


@torch.inference_mode()
def run_probes(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    sets: Sequence[ProbeSet],
    *,
    max_new_tokens: int,
    fmt: PromptFormat | None = None,
    extractor: AnswerExtractor | None = None,
) -> tuple[ProbeResult, ...]:
    """The model measured on every probe set, in stage order (the model is left in eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    vocab = len(tokenizer)
    results = []
    for s in sets:
        batch = to_torch(s.encoded, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[..., :vocab].float()  # drop padded embedding rows
        loss = float(masked_nll(logits, batch["input_ids"], batch["loss_mask"]).mean())
        kls = tuple(teacher_kl(logits, batch["loss_mask"], t) for t in s.teacher_targets)
        acc = evaluate_accuracy(
            model,
            tokenizer,
            s.examples,
            max_new_tokens=max_new_tokens,
            fmt=fmt or PromptFormat(),
            extractor=extractor,
        )
        results.append(
            ProbeResult(stage=s.stage, loss=loss, accuracy=acc["accuracy"], kl_to_teacher=kls)
        )
    return tuple(results)
