"""Plain, in-process training and evaluation helpers shared by the ladder, the actors and benchmarks.

``lm_loss`` is the supervised loss on reference targets; ``generate_texts`` is greedy or sampled
decoding in the run's prompt format (plain or chat template), stopping at the eos / end of turn;
``evaluate_accuracy`` is exact-match accuracy overall and by difficulty (CoT step count), with
every prediction returned, beside the full-chain exact match (the whole generation is the
reference chain of thought and answer) and the floor (:func:`answer_floor`: the accuracy of always
giving the evaluation set's most common answer; multiplication mod 10 makes "0" common, so an
accuracy means little until it clears this).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from clpd_ray.data.batching import Encoded, encode_prompts, tokenize_rows
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat

__all__ = [
    "answer_floor",
    "chain_matches",
    "evaluate_accuracy",
    "generate_texts",
    "lm_loss",
    "make_optimizer",
    "masked_nll",
    "to_torch",
]

_PLAIN = PromptFormat()


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
    fmt: PromptFormat = _PLAIN,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 256,
) -> list[str]:
    """Continuations of ``fmt.prompt_text`` of each prompt, in input order.

    Greedy unless ``do_sample`` (then sampled at ``temperature``, reproducible by ``seed``
    without touching the global RNG). Each continuation ends before the first stop token (the
    eos, or the chat template's end-of-turn marker) and is decoded without special tokens.
    Prompts are grouped by token length so most groups need no padding at all.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    texts_in = [fmt.prompt_text(tokenizer, p) for p in prompts]
    lengths = (
        [len(x) for x in tokenizer(texts_in, add_special_tokens=False)["input_ids"]]
        if texts_in
        else []
    )
    order = np.argsort(lengths, kind="stable")
    stops = fmt.stop_token_ids(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = [""] * len(prompts)
    # A complete generation config, so a checkpoint's own defaults (Qwen instruct models ship
    # sampling, top-k/p and a repetition penalty) never change what "greedy" or "sample" means.
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=0 if do_sample else 50,
        top_p=1.0,
        repetition_penalty=1.0,
        pad_token_id=pad,
        eos_token_id=stops,
    )
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices, enabled=do_sample):
        if do_sample:
            torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, attn = encode_prompts(tokenizer, [prompts[i] for i in idx], fmt)
            gen = model.generate(  # type: ignore[operator]
                input_ids=torch.as_tensor(ids, device=device),
                attention_mask=torch.as_tensor(attn, device=device),
                generation_config=config,
            )
            for i, row in zip(idx, gen[:, ids.shape[1] :].tolist(), strict=True):
                cut = next((j for j, t in enumerate(row) if t in stops), len(row))
                out[int(i)] = str(tokenizer.decode(row[:cut], skip_special_tokens=True))
    model.train(was_training)
    return out


def answer_floor(
    examples: Sequence[Example], normalise: Callable[[str], str | None] | None = None
) -> tuple[float, str | None]:
    """(share, answer): the best constant answer on ``examples`` and the accuracy it scores.

    The answer is the most common gold answer (after ``normalise``, e.g. an extractor's, so
    "72.0" and "72" count as one); ties go to the smallest answer string, so the result does not
    depend on the examples' order. ``(0.0, None)`` for no examples.
    """
    norm = normalise or (lambda a: a.strip())
    counts = Counter(norm(e.answer) for e in examples)
    counts.pop(None, None)
    if not counts:
        return 0.0, None
    best = max(counts.values())
    answer = min(a for a, c in counts.items() if c == best and a is not None)
    return best / len(examples), answer


def chain_matches(generation: str, target: str) -> bool:
    """Full-chain exact match: the generation is the reference chain of thought and answer,
    whitespace runs counted as one space and ends stripped."""
    return " ".join(generation.split()) == " ".join(target.split())


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_new_tokens: int | None = None,
    fmt: PromptFormat = _PLAIN,
    extractor: AnswerExtractor | None = None,
    batch_size: int = 256,
) -> dict:
    """Exact-match accuracy of greedy generations.

    Returns ``{"accuracy": float, "by_difficulty": {steps: acc}, "n": int, "predictions":
    [{"prompt", "generation", "extracted", "gold", "correct", "full_chain", "steps"}, ...]}``
    (predictions in input order), and beside them ``full_chain`` / ``full_chain_by_difficulty``
    (:func:`chain_matches` shares) and ``floor`` / ``floor_answer`` / ``floor_by_difficulty``
    (:func:`answer_floor` of the examples, by the extractor's normalisation). ``extractor``
    defaults to numbers after a ``#`` marker, no fallback.
    """
    extractor = extractor or AnswerExtractor()
    if max_new_tokens is None:
        rows = tokenize_rows(tokenizer, examples, fmt)
        max_new_tokens = max((len(ids) - n - 1 for ids, n in rows), default=0) + 2
    texts = generate_texts(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        fmt=fmt,
        batch_size=batch_size,
    )
    hits: dict[int, list[bool]] = defaultdict(list)
    chains: dict[int, list[bool]] = defaultdict(list)
    by_level: dict[int, list[Example]] = defaultdict(list)
    predictions = []
    for e, t in zip(examples, texts, strict=True):
        got = extractor.extract(t)
        ok = got is not None and got == extractor.normalise(e.answer)
        chain = chain_matches(t, e.target)
        hits[e.steps].append(ok)
        chains[e.steps].append(chain)
        by_level[e.steps].append(e)
        predictions.append(
            {
                "prompt": e.prompt,
                "generation": t,
                "extracted": got,
                "gold": e.answer,
                "correct": ok,
                "full_chain": chain,
                "steps": int(e.steps),
            }
        )
    allhits = [h for v in hits.values() for h in v]
    allchains = [c for v in chains.values() for c in v]
    floor, floor_answer = answer_floor(examples, extractor.normalise)
    return {
        "accuracy": float(np.mean(allhits)) if allhits else 0.0,
        "by_difficulty": {int(k): float(np.mean(v)) for k, v in sorted(hits.items())},
        "n": len(allhits),
        "predictions": predictions,
        "full_chain": float(np.mean(allchains)) if allchains else 0.0,
        "full_chain_by_difficulty": {int(k): float(np.mean(v)) for k, v in sorted(chains.items())},
        "floor": floor,
        "floor_answer": floor_answer,
        "floor_by_difficulty": {
            int(k): answer_floor(v, extractor.normalise)[0] for k, v in sorted(by_level.items())
        },
    }
