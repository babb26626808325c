"""A teacher model as an inference service: top-k distillation targets and generated CoT.

One instance per rung of the ladder. ``targets`` is idempotent (the same batch gives the same
targets), so the launcher lets Ray retry it on a restarted actor.

Target store (``teachers.target_store``; runtime/target_store.py): ``targets`` assembles a batch's
targets from per-example entries and computes (and stores) only the missing rows, each example
in a forward pass of its own, so an entry is the same bits whatever batch, call or run computed
it. ``precompute`` is the same without the answer: the executor sends an idle teacher the
examples its stage will draw, in the sampler's order, so most of its targets are ready when its
stage begins.
"""

from __future__ import annotations

import hashlib
import json
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
from clpd_ray.distill.models import count_parameters, load_causal_lm
from clpd_ray.distill.sequence import ChainCache, SequenceSettings, chain_seed, chains_to_batch
from clpd_ray.distill.target_store import Entry, join_rows, row_keys, teacher_key
from clpd_ray.distill.training import evaluate_accuracy, generate_texts
from clpd_ray.messages import Batch, GeneratedBatch, TeacherTargets
from clpd_ray.runtime.actors.device import assigned_gpu_ids, pick_device, set_threads
from clpd_ray.runtime.identity import model_fingerprint
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.models_store import fetch
from clpd_ray.runtime.target_store import TargetStore

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
        target_store: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        """``student_tokenizer_dir``: the student's tokenizer, which sequence-level KD re-tokenizes
        the generated chains with (None: the teacher's own). ``dtype``, ``micro_batch`` and
        ``target_dtype`` are ``teachers.dtype`` / ``.micro_batch`` / ``.target_dtype``.
        ``target_store``: the store's root location (runtime/target_store.store_location), None
        for no store; ``weights_sha256``: the weights' fingerprint when the driver has it
        (run.json), else the teacher hashes its weight files when the store is first used."""
        set_threads(threads)
        self.name = name
        self.index = index
        self.device = pick_device()
        model_dir = fetch(model_dir)  # a storage URI: a node-local copy (models_store)
        self._model_dir = Path(model_dir)
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
        self._store_root = target_store
        self._weights_sha256 = weights_sha256
        self._store: TargetStore | None = None  # opened on first use (fingerprinting costs I/O)
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

    def fingerprint(self) -> str:
        """sha256 of everything besides the settings that decides this teacher's targets: its
        weights and model config, the dtype it runs in, its vocabulary, the device kind and the
        torch version (kernels differ in their last bits across devices and versions)."""
        h = hashlib.sha256()
        weights = self._weights_sha256 or model_fingerprint(self._model_dir)["sha256"]
        h.update(str(weights).encode())
        config = self._model_dir / "config.json"
        h.update(config.read_bytes() if config.is_file() else b"")
        dtype = next(self.model.parameters()).dtype
        kind = self.device.type
        if self.device.type == "cuda":
            kind += ":" + torch.cuda.get_device_name(self.device)
        h.update(json.dumps([str(dtype), self.vocab_size, kind, torch.__version__]).encode())
        return h.hexdigest()

    def store(self) -> TargetStore | None:
        """The target store (None when ``teachers.target_store`` is off)."""
        if self._store is None and self._store_root is not None:
            key = teacher_key(self.fingerprint(), self.top_k, self.temperature, self.target_dtype)
            self._store = TargetStore(self._store_root, self.name, key)
        return self._store

    def _rows(self, batch: Batch, rows: Sequence[int]) -> list[Entry]:
        """Targets of the given rows, each row in a forward pass of its own (trailing padding
        cut): the same computation whatever batch the example came in."""
        out = []
        for r in rows:
            one = slice(r, r + 1)
            t = self._compute(
                Batch(
                    step=batch.step,
                    stage=batch.stage,
                    input_ids=batch.input_ids[one],
                    attention_mask=batch.attention_mask[one],
                    loss_mask=np.asarray(batch.loss_mask[one], dtype=bool),
                    example_ids=np.asarray(batch.example_ids)[one],
                )
            )
            out.append((t.logprobs, t.ids))
        return out

    def _from_store(self, store: TargetStore, batch: Batch) -> list[Entry]:
        """Every row's entry: stored ones read, missing ones computed and stored."""
        keys = row_keys(batch.example_ids, batch.input_ids, batch.attention_mask, batch.loss_mask)
        found = store.get(keys)
        todo: dict[str, int] = {}  # missing key -> its first row (a batch may repeat an example)
        for r, (k, e) in enumerate(zip(keys, found, strict=True)):
            if e is None:
                todo.setdefault(k, r)
        store.hits += len(keys) - len(todo)
        store.misses += len(todo)
        if todo:
            computed = self._rows(batch, list(todo.values()))
            store.put(list(todo), computed)
            new = dict(zip(todo, computed, strict=True))
            found = [e if e is not None else new[k] for k, e in zip(keys, found, strict=True)]
        return [e for e in found if e is not None]

    def targets(self, batch: Batch) -> TeacherTargets:
        """Top-k targets for ``batch``: from the store where it has them, computed (and stored)
        where not; without a store, the batch computed as a whole."""
        store = self.store()
        if store is None:
            out = self._compute(batch)
        else:
            start = time.perf_counter()
            entries = self._from_store(store, batch)
            lp_dtype = np.dtype(np.uint16 if self.target_dtype == "bfloat16" else self.target_dtype)
            logprobs, ids = join_rows(entries, self.top_k, lp_dtype)
            out = TeacherTargets(
                teacher=self.name,
                step=batch.step,
                logprobs=logprobs,
                ids=ids,
                temperature=self.temperature,
                latency_s=time.perf_counter() - start,
            )
        self.bytes_sent += out.nbytes
        self.tokens_sent += out.logprobs.shape[0]
        return out

    def precompute(self, batch: Batch) -> int:
        """Store the targets of ``batch``'s examples that are not stored yet (idle-time work
        ahead); returns how many were computed (0 without a store)."""
        store = self.store()
        if store is None:
            return 0
        before = store.misses
        self._from_store(store, batch)
        done = store.misses - before
        store.misses = before  # work ahead is not a request: neither a hit nor a miss
        store.hits -= len(batch.example_ids) - done
        store.ahead += done
        return done

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
            **({"target_store": self._store.stats()} if self._store is not None else {}),
            "bytes_sent": self.bytes_sent,
            "tokens_sent": self.tokens_sent,
            "logit_width": int(self.model.config.get_text_config().vocab_size),
            "parameters": count_parameters(self.model),
        }

    def gpu_ids(self) -> list[str]:
        return assigned_gpu_ids()

    def ping(self) -> str:
        return self.name
