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

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from clpd_ray.config import TeachersConfig
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.chunked import output_head, used_width
from clpd_ray.distill.compact import encode_logprobs
from clpd_ray.distill.losses import topk_targets
from clpd_ray.distill.models import load_causal_lm
from clpd_ray.distill.sequence import ChainCache, SequenceSettings, chain_seed, chains_to_batch
from clpd_ray.distill.training import evaluate_accuracy, generate_texts
from clpd_ray.messages import Batch, GeneratedBatch, TeacherTargets
from clpd_ray.runtime.actors.device import assigned_gpu_ids, pick_device, set_threads
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.models_store import fetch

__all__ = ["TeacherService"]

_TEACHERS = TeachersConfig.model_fields  # the defaults below live in config.py
# Logits computed at once: rows x vocabulary <= this many (2**25 float32 = 128 MiB per copy).
_PROJECTION_ELEMENTS = 1 << 25


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
        student_tokenizer_dir: str | Path | None = None,
        dtype: str = _TEACHERS["dtype"].default,
        micro_batch: int = _TEACHERS["micro_batch"].default,
        target_dtype: str = _TEACHERS["target_dtype"].default,
    ) -> None:
        """``student_tokenizer_dir``: the student's tokenizer, which sequence-level KD re-tokenizes
        the generated chains with (None: the teacher's own). ``dtype``, ``micro_batch`` and
        ``target_dtype`` are ``teachers.dtype`` / ``.micro_batch`` / ``.target_dtype``."""
        set_threads(threads)
        self.name = name
        self.index = index
        self.device = pick_device()
        model_dir = fetch(model_dir)  # a storage URI: a node-local copy (models_store)
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, dtype).to(self.device).eval()  # type: ignore[arg-type]
        self.vocab_size = len(self.tokenizer)  # logits are sliced to it: padded rows never targets
        self.top_k = min(top_k, self.vocab_size)
        self.temperature = temperature
        self.micro_batch = micro_batch
        self.target_dtype = target_dtype
        # (body, output projection), or None: logits need post-processing, take them whole.
        self._head = output_head(self.model)
        self._rows_per_chunk = max(1, _PROJECTION_ELEMENTS // self.vocab_size)
        self.metrics = RunMetrics(run_id)
        self._cache: dict[int, tuple[int, TeacherTargets]] = {}  # step -> (batch key, targets)
        self.busy_s = 0.0
        self.bytes_sent = 0  # payload of the targets handed out (log-probabilities + ids)
        self.tokens_sent = 0  # scored positions they cover
        self._student_tokenizer_dir = student_tokenizer_dir
        self._student_tokenizer: PreTrainedTokenizerBase | None = None  # loaded on first generate
        self._chains = ChainCache()

    def __repr__(self) -> str:
        # Safe on a half-built object: Ray calls repr when __init__ raised, and a repr that
        # raised there would crash the worker and make Ray restart it forever.
        name, rung, k, device = (
            getattr(self, a, "?") for a in ("name", "index", "top_k", "device")
        )
        return f"TeacherService({name}, rung={rung}, k={k}, device={device})"

    def _topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, V_padded) logits -> top-k (logprobs float32 (n, K), ids (n, K)), chunk by chunk."""
        lps, ids = [], []
        for chunk in logits.split(self._rows_per_chunk):
            lp, top = topk_targets(chunk[:, : self.vocab_size], self.top_k, self.temperature)
            lps.append(lp)
            ids.append(top)
        return torch.cat(lps), torch.cat(ids)

    @torch.inference_mode()
    def _compute(self, batch: Batch) -> TeacherTargets:
        """Targets at the scored positions, ``micro_batch`` rows per forward pass.

        The body's hidden states are kept only at scored positions; the output projection and
        the top-k run on at most ``_PROJECTION_ELEMENTS`` logits at a time (float32), so the
        full-vocabulary logits never exist for a whole batch, nor for prompt or padding.
        """
        start = time.perf_counter()
        loss_mask = np.asarray(batch.loss_mask, dtype=bool)
        lps: list[torch.Tensor] = []
        tops: list[torch.Tensor] = []
        for r in range(0, loss_mask.shape[0], self.micro_batch):
            rows = slice(r, r + self.micro_batch)
            if not loss_mask[rows].any():
                continue
            width = used_width(batch.attention_mask[rows], loss_mask[rows])  # trailing padding
            ids = torch.as_tensor(batch.input_ids[rows, :width], device=self.device)
            attn = torch.as_tensor(batch.attention_mask[rows, :width], device=self.device)
            mask = torch.as_tensor(loss_mask[rows, :width], device=self.device)  # (b, t)
            if self._head is not None:
                base, head = self._head
                out = base(input_ids=ids, attention_mask=attn, use_cache=False)
                hidden = out.last_hidden_state[mask]  # (n, H): scored positions only
                del out
                for h in hidden.split(self._rows_per_chunk):
                    lp, top = self._topk(head(h))
                    lps.append(lp)
                    tops.append(top)
            else:  # soft-capped/scaled logits: the model's own, one micro-batch at a time
                logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                lp, top = self._topk(logits[mask])  # (n, V_padded) -> (n, K)
                del logits
                lps.append(lp)
                tops.append(top)
        k = self.top_k
        logprobs = torch.cat(lps) if lps else torch.zeros((0, k))
        top_ids = torch.cat(tops) if tops else torch.zeros((0, k), dtype=torch.int64)
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        self.metrics.teacher_latency(self.name, elapsed, batch.num_target_tokens)
        return TeacherTargets(
            teacher=self.name,
            step=batch.step,
            logprobs=encode_logprobs(logprobs, self.target_dtype),  # (N, K)
            ids=top_ids.to(torch.int32).cpu().numpy(),  # (N, K)
            temperature=self.temperature,
            latency_s=elapsed,
        )

    def targets(self, batch: Batch) -> TeacherTargets:
        """Top-k targets for ``batch`` (from the precompute cache when present)."""
        cached = self._cache.pop(batch.step, None)
        if cached is not None and cached[0] == _batch_key(batch):
            out = cached[1]
        else:
            out = self._compute(batch)
        self.bytes_sent += out.nbytes
        self.tokens_sent += out.logprobs.shape[0]
        return out

    def precompute(self, batches: Sequence[Batch]) -> int:
        """Compute and cache targets for future batches (idle-time work); returns the cache size."""
        for b in batches:
            self._cache[b.step] = (_batch_key(b), self._compute(b))
        return len(self._cache)

    def _student_tok(self) -> PreTrainedTokenizerBase:
        if self._student_tokenizer is None:
            d = self._student_tokenizer_dir
            self._student_tokenizer = self.tokenizer if d is None else load_tokenizer(fetch(d))
        return self._student_tokenizer

    def generate(
        self, batch: Batch, settings: SequenceSettings
    ) -> tuple[GeneratedBatch, dict[str, int | str]]:
        """Sequence-level KD: chains for the batch's prompts, generated with this teacher's
        tokenizer and format, verified, and encoded with the STUDENT's tokenizer
        (distill/sequence.py). Returns the batch and its counters (two Ray returns, so the driver
        fetches the counters without the batch)."""
        start = time.perf_counter()
        ids = [int(i) for i in batch.example_ids]
        chains = self._chains.lookup(self.name, ids, settings)
        todo = [i for i, c in enumerate(chains) if c is None]
        if todo:
            texts = generate_texts(
                self.model,
                self.tokenizer,
                [batch.prompts[i] for i in todo],
                max_new_tokens=settings.max_new_tokens,
                fmt=settings.fmt,
                do_sample=settings.sample,
                temperature=settings.temperature,
                seed=chain_seed(settings.seed, batch.step),
            )
            self._chains.store(self.name, [ids[i] for i in todo], texts, settings)
            for i, t in zip(todo, texts, strict=True):
                chains[i] = t
        elapsed = time.perf_counter() - start
        out = chains_to_batch(
            self.name,
            batch,
            [c or "" for c in chains],
            self._student_tok(),
            settings,
            cached=len(ids) - len(todo),
            latency_s=elapsed,
        )
        self.busy_s += elapsed
        self.metrics.teacher_latency(self.name, elapsed, out.batch.num_target_tokens)
        return out, out.counts()

    def evaluate(
        self,
        examples: Sequence[Example],
        max_new_tokens: int,
        fmt: PromptFormat | None = None,
        extractor: AnswerExtractor | None = None,
    ) -> dict:
        """Answer accuracy of the teacher's greedy generations (the run's format and extractor)."""
        return evaluate_accuracy(
            self.model,
            self.tokenizer,
            examples,
            max_new_tokens=max_new_tokens,
            fmt=fmt or PromptFormat(),
            extractor=extractor,
        )

    def stats(self) -> dict:
        return {
            "name": self.name,
            "busy_s": self.busy_s,
            "cached": len(self._cache),
            "bytes_sent": self.bytes_sent,
            "tokens_sent": self.tokens_sent,
            "logit_width": int(self.model.config.get_text_config().vocab_size),
        }

    def gpu_ids(self) -> list[str]:
        return assigned_gpu_ids()

    def ping(self) -> str:
        return self.name


def _batch_key(batch: Batch) -> int:
    """Which batch cached targets belong to (the step alone can repeat across replays)."""
    return hash((batch.input_ids.tobytes(), np.asarray(batch.loss_mask).tobytes()))
