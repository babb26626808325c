"""Plain, in-process training and evaluation helpers shared by the ladder, the actors and benchmarks.

``lm_step`` is one supervised step on reference targets; ``generate_texts`` is greedy decoding;
``evaluate_accuracy`` is exact-match accuracy overall and by difficulty (CoT step count).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from clpd_ray.data.batching import Encoded, encode_prompts
from clpd_ray.data.example import Example, answers_match

__all__ = [
    "evaluate_accuracy",
    "generate_texts",
    "lm_loss",
    "make_optimizer",
    "masked_nll",
    "to_torch",
]


def to_torch(enc: Encoded, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.as_tensor(enc.input_ids, device=device),
        "attention_mask": torch.as_tensor(enc.attention_mask, device=device),
        "loss_mask": torch.as_tensor(enc.loss_mask, device=device),
    }


def masked_nll(
    logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    """Per-row mean next-token NLL over ``loss_mask`` positions. (B, T, V), (B, T), (B, T) -> (B,)."""
    labels = torch.roll(input_ids, shifts=-1, dims=1)  # position t predicts token t+1
    nll = torch.nn.functional.cross_entropy(
        logits.float().transpose(1, 2), labels, reduction="none"
    )  # (B, T)
    m = loss_mask.float()
    return (nll * m).sum(1) / m.sum(1).clamp_min(1.0)


def lm_loss(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token cross-entropy on the target tokens of a batch (hard labels)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = torch.roll(batch["input_ids"], shifts=-1, dims=1)
    mask = batch["loss_mask"]
    if not bool(mask.any()):
        return logits.sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[mask].float(), labels[mask])


def make_optimizer(
    model: torch.nn.Module, lr: float, total_steps: int, warmup: int, weight_decay: float = 0.0
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with linear warm-up then cosine decay to 10% of ``lr``."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def generate_texts(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 256,
) -> list[str]:
    """Greedy continuations of ``prompts`` (decoded, special tokens dropped), in input order.

    Prompts are grouped by token length so most groups need no padding at all.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    lengths = [len(x) for x in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, attn = encode_prompts(tokenizer, [prompts[i] for i in idx])
        gen = model.generate(  # type: ignore[operator]
            input_ids=torch.as_tensor(ids, device=device),
            attention_mask=torch.as_tensor(attn, device=device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        texts = tokenizer.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)
        for i, t in zip(idx, texts, strict=True):
            out[int(i)] = t
    model.train(was_training)
    return out


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 256,
) -> dict:
    """Exact-match accuracy: ``{"accuracy": float, "by_difficulty": {steps: acc}, "n": int}``."""
    if max_new_tokens is None:
        targets = tokenizer([e.target for e in examples], add_special_tokens=False)["input_ids"]
        max_new_tokens = max(len(t) for t in targets) + 2
    texts = generate_texts(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
    )
    hits: dict[int, list[bool]] = defaultdict(list)
    for e, t in zip(examples, texts, strict=True):
        hits[e.steps].append(answers_match(t, e.answer))
    allhits = [h for v in hits.values() for h in v]
    return {
        "accuracy": float(np.mean(allhits)) if allhits else 0.0,
        "by_difficulty": {int(k): float(np.mean(v)) for k, v in sorted(hits.items())},
        "n": len(allhits),
    }
