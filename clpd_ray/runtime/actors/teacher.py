"""A teacher model as an inference service: top-k distillation targets and generated CoT.

One instance per rung of the ladder. ``targets`` is idempotent (the same batch gives the same
targets), so the launcher lets Ray retry it on a restarted actor. ``precompute`` lets a teacher the
schedule will need later fill a cache with targets for its future stage's batches while it would
otherwise sit idle; ``targets`` then answers from the cache.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch

from clpd_ray.data.batching import encode_examples
from clpd_ray.data.example import Example
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.losses import topk_targets
from clpd_ray.distill.models import load_causal_lm
from clpd_ray.distill.training import evaluate_accuracy, generate_texts
from clpd_ray.messages import Batch, GeneratedBatch, TeacherTargets
from clpd_ray.runtime.actors.device import assigned_gpu_ids, pick_device, set_threads
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.models_store import fetch

__all__ = ["TeacherService"]


class TeacherService:
    def __init__(
        self,
        name: str,
        index: int,
        model_dir: str | Path,
        *,
        top_k: int,
        temperature: float = 1.0,
        run_id: str = "local",
        threads: int | None = 1,
    ) -> None:
        set_threads(threads)
        self.name = name
        self.index = index
        self.device = pick_device()
        model_dir = fetch(model_dir)  # a storage URI: a node-local copy (models_store)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir).to(self.device).eval()  # type: ignore[arg-type]
        self.vocab_size = len(self.tokenizer)
        self.top_k = min(top_k, self.vocab_size)
        self.temperature = temperature
        self.metrics = RunMetrics(run_id)
        self._cache: dict[int, TeacherTargets] = {}
        self.busy_s = 0.0

    def __repr__(self) -> str:
        # Safe on a half-built object: Ray calls repr when __init__ raised, and a repr that
        # raised there would crash the worker and make Ray restart it forever.
        name, rung, k, device = (
            getattr(self, a, "?") for a in ("name", "index", "top_k", "device")
        )
        return f"TeacherService({name}, rung={rung}, k={k}, device={device})"

    @torch.inference_mode()
    def _compute(self, batch: Batch) -> TeacherTargets:
        start = time.perf_counter()
        ids = torch.as_tensor(batch.input_ids, device=self.device)
        attn = torch.as_tensor(batch.attention_mask, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=attn).logits  # (B, T, V_padded)
        logits = logits[..., : self.vocab_size]  # drop padded embedding rows, never pad
        logprobs, top = topk_targets(logits, self.top_k, self.temperature)  # (B, T, K) x2
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        self.metrics.teacher_latency(self.name, elapsed, batch.num_target_tokens)
        return TeacherTargets(
            teacher=self.name,
            step=batch.step,
            logprobs=logprobs.float().cpu().numpy(),
            ids=top.cpu().numpy(),
            temperature=self.temperature,
            latency_s=elapsed,
        )

    def targets(self, batch: Batch) -> TeacherTargets:
        """Top-k targets for ``batch`` (from the precompute cache when present)."""
        cached = self._cache.pop(batch.step, None)
        if cached is not None and cached.logprobs.shape[:2] == batch.input_ids.shape:
            return cached
        return self._compute(batch)

    def precompute(self, batches: Sequence[Batch]) -> int:
        """Compute and cache targets for future batches (idle-time work); returns the cache size."""
        for b in batches:
            self._cache[b.step] = self._compute(b)
        return len(self._cache)

    def generate(self, batch: Batch, max_new_tokens: int) -> GeneratedBatch:
        """Sequence-level KD: greedy CoT for the batch's prompts, encoded as a training batch."""
        start = time.perf_counter()
        texts = generate_texts(
            self.model, self.tokenizer, batch.prompts, max_new_tokens=max_new_tokens
        )
        examples = [Example(p, t.strip(), "", 0) for p, t in zip(batch.prompts, texts, strict=True)]
        enc = encode_examples(self.tokenizer, examples)
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        self.metrics.teacher_latency(self.name, elapsed, int(enc.loss_mask.sum()))
        out = Batch(
            step=batch.step,
            stage=batch.stage,
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            loss_mask=enc.loss_mask,
            example_ids=batch.example_ids,
            prompts=batch.prompts,
        )
        return GeneratedBatch(teacher=self.name, batch=out, latency_s=elapsed)

    def evaluate(self, examples: Sequence[Example], max_new_tokens: int) -> dict:
        return evaluate_accuracy(
            self.model, self.tokenizer, examples, max_new_tokens=max_new_tokens
        )

    def stats(self) -> dict:
        return {"name": self.name, "busy_s": self.busy_s, "cached": len(self._cache)}

    def gpu_ids(self) -> list[str]:
        return assigned_gpu_ids()

    def ping(self) -> str:
        return self.name
