"""The teacher ladder: train (or load) teachers of increasing capacity and cache them.

Each teacher in ``config.teachers.ladder`` without a ``path`` is built (``ModelSpec``) and trained
locally with plain supervised learning on the training examples (the embedded task, or external
data such as GSM8K on a real tokenizer), then cached as a ``save_pretrained`` directory
(safetensors + tokenizer + ``accuracy.json``), keyed by the data, the tokenizer and the teacher's
settings, so a second run loads it instantly. Several missing teachers train at once, one
process each (``ladder_pool``), the longest first. Teachers with a ``path`` are loaded as they
are and scored on the same held-out set, their scores cached beside the built teachers::

    <cache_dir>/teachers/<name>-<key>/
        config.json  model.safetensors  tokenizer.json ...  accuracy.json
    <cache_dir>/teachers/scores/<name>-<key>.json     (teachers given by path)

At a real vocabulary (151,936 rows) the full (batch x T x V) float32 logits are never made: the
loss is computed over the loss positions only, a chunk at a time (``_lm_loss``).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from clpd_ray.config import Config, TaskConfig, TeacherSpec, check_path_name, default_cache_dir
from clpd_ray.data.batching import Encoded, encode_examples, pad_id, pad_rows, tokenize_rows
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.task import HELD_OUT_SPLIT
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.chunked import chunked_sum, output_head
from clpd_ray.distill.ladder_pool import TeacherJob, train_in_processes, worker_count
from clpd_ray.distill.losses import hard_ce_loss_flat
from clpd_ray.distill.models import build_model, count_parameters, load_causal_lm
from clpd_ray.distill.training import evaluate_accuracy, make_optimizer, to_torch
from clpd_ray.errors import ConfigError

__all__ = [
    "LadderEntry",
    "accuracy_table",
    "capped",
    "ensure_ladder",
    "examples_digest",
    "held_out_loss",
    "teacher_cache_key",
    "tokenizer_digest",
    "train_teacher",
]

# Bump when the task, the tokenizer or the training recipe changes, to invalidate old caches.
LADDER_VERSION = 1
# Loss positions per chunk of the vocabulary projection: (chunk x V) float32 logits at a time.
LOSS_CHUNK = 256
_PLAIN = PromptFormat()
# Below this many (B x T x V) logits one plain pass is cheaper than chunking (the embedded task).
_DENSE_LOGITS = 1 << 24


@dataclass(frozen=True)
class LadderEntry:
    name: str
    path: Path  # a save_pretrained directory (model + tokenizer)
    accuracy: dict | None  # accuracy.json contents, None for external teachers without one
    parameters: int | None = None


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def examples_digest(examples: Sequence[Example]) -> str:
    """A content hash of examples (what a teacher trains or is scored on)."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.prompt, e.target, e.answer, e.steps]).encode() + b"\n")
    return h.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A content hash of a tokenizer: its token map and merges, chat template, special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    return _digest([text, tokenizer.chat_template, tokenizer.special_tokens_map])


def _spec_key(spec: TeacherSpec) -> dict:
    # Keys added after version 1 enter the payload only when set: old caches stay valid.
    unset = {k for k in ("tokenizer", "vocab_size") if getattr(spec, k) is None}
    # ``replicas`` is how many actors serve the teacher, not how it is trained.
    return spec.model_dump(mode="json", exclude={"name", "replicas", *unset})


def _task_key(config: Config) -> dict:
    # The default task's name is left out, so caches built before task.name existed stay valid.
    unset = {"name"} if config.task.name == TaskConfig.model_fields["name"].default else set()
    return config.task.model_dump(mode="json", exclude=unset)


def capped(spec: TeacherSpec, max_train_steps: int | None) -> TeacherSpec:
    """``spec`` with its ``train_steps`` cut to ``teachers.max_train_steps`` where that is set."""
    if max_train_steps is None or spec.train_steps <= max_train_steps:
        return spec
    return spec.model_copy(update={"train_steps": max_train_steps})


def teacher_cache_key(
    config: Config,
    spec: TeacherSpec,
    data: tuple[Sequence[Example], Sequence[Example], PreTrainedTokenizerBase] | None = None,
) -> str:
    """The cache key of a built teacher: its settings and what it is trained and scored on.

    ``data`` (train, held-out, tokenizer) is needed for external data: the key then covers the
    examples themselves, the tokenizer and the training length; the embedded task is keyed by
    its settings."""
    payload: dict = {
        "version": LADDER_VERSION,
        "task": _task_key(config),
        "teacher": _spec_key(spec),
        "batch_size": config.teachers.batch_size,
        "seed": config.seed,
    }
    if config.data.path is not None:
        if data is None:
            raise ValueError("teacher_cache_key: external data needs (train, held_out, tokenizer)")
        train, held_out, tokenizer = data
        del payload["task"]
        payload.update(
            train=examples_digest(train),
            held_out=examples_digest(held_out),
            tokenizer=tokenizer_digest(tokenizer),
            max_length=_max_length(config, spec),
            format=[config.data.chat_template, config.data.system_prompt],
        )
    else:  # the embedded task's held-out set (its accuracy.json) is drawn this way
        payload["held_out"] = HELD_OUT_SPLIT
    return _digest(payload)[:12]


def _max_length(config: Config, spec: TeacherSpec) -> int | None:
    """Training length of a built teacher: train.max_length, within its positions."""
    if config.data.path is None:
        return None  # the embedded task's examples fit (its teachers were always trained so)
    limit = config.train.max_length
    return spec.max_positions if limit is None else min(limit, spec.max_positions)


def _lm_loss(
    model: PreTrainedModel,
    batch: dict[str, torch.Tensor],
    vocab_size: int,
    *,
    split: tuple[torch.nn.Module, torch.nn.Module] | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross-entropy on the loss positions, logits sliced to the tokenizer's ``vocab_size``
    (padded embedding rows are no token).

    With ``split`` = (body, head) (``chunked.output_head``) and more than a small batch's worth
    of logits, only the N loss positions' hidden states (N, H) go through the head, a chunk of
    (LOSS_CHUNK, V) float32 logits at a time (``chunked.chunked_sum``): never (B, T, V)."""
    ids, mask, attn = batch["input_ids"], batch["loss_mask"], batch["attention_mask"]
    labels = torch.roll(ids, shifts=-1, dims=1)[mask]  # (N,) position t predicts token t+1
    if split is None or ids.numel() * vocab_size <= _DENSE_LOGITS:
        logits = model(input_ids=ids, attention_mask=attn).logits  # (B, T, V_padded)
        if not bool(mask.any()):
            return logits.sum() * 0.0
        rows = logits[mask][:, :vocab_size].float()  # (N, V)
        return torch.nn.functional.cross_entropy(rows, labels, reduction=reduction)
    body, head = split
    hidden = body(input_ids=ids, attention_mask=attn).last_hidden_state[mask]  # (N, H)
    total = chunked_sum(
        hidden,
        lambda h, sl: hard_ce_loss_flat(head(h)[:, :vocab_size], labels[sl], reduction="sum"),
        LOSS_CHUNK,
    )
    return total if reduction == "sum" else total / max(1, hidden.shape[0])


@torch.no_grad()
def held_out_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    max_length: int | None = None,
    fmt: PromptFormat = _PLAIN,
    batch_size: int = 8,
) -> dict:
    """Mean next-token NLL (nats) per target token of ``examples``, teacher-forced."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    split = output_head(model)
    nll, tokens = 0.0, 0
    for s in range(0, len(examples), batch_size):
        enc = encode_examples(tokenizer, examples[s : s + batch_size], max_length, fmt)
        batch = to_torch(enc, device)
        nll += float(_lm_loss(model, batch, len(tokenizer), split=split, reduction="sum"))
        tokens += int(enc.loss_mask.sum())
    model.train(was_training)
    return {"loss": round(nll / max(1, tokens), 4), "loss_tokens": tokens}


def train_teacher(
    spec: TeacherSpec,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    held_out: list[Example],
    *,
    batch_size: int,
    seed: int,
    out_dir: Path,
    progress: bool = True,
    max_length: int | None = None,
    max_new_tokens: int | None = None,
    fmt: PromptFormat = _PLAIN,
    extractor: AnswerExtractor | None = None,
    on_step: Callable[[int], None] | None = None,
) -> LadderEntry:
    """Train one teacher on ``train``, measure it on ``held_out``, write it atomically to ``out_dir``.

    ``on_step(steps_done)`` is called after each step (the worker processes report through it).
    Processes training the same teacher into one cache (two runs on a node) take turns on a lock
    beside the entry: the later one finds the entry complete and trains nothing, instead of
    deleting the other's half-written files."""
    _check_entry_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out_dir.with_name(out_dir.name + ".lock"))):
        done = _cached_entry(spec.name, out_dir)
        if done is not None:
            return done
        rows = _TokenRows.encode(tokenizer, train, max_length, fmt)  # once, not every step
        model = build_model(spec, tokenizer, seed=seed)
        split = output_head(model)
        model.train()
        opt, sched = make_optimizer(
            model, spec.lr, spec.train_steps, warmup=min(100, spec.train_steps // 10)
        )
        rng = np.random.default_rng([seed, 7])
        start = time.perf_counter()
        bar = tqdm(
            range(spec.train_steps), desc=f"train {spec.name}", disable=not progress, leave=False
        )
        for step in bar:
            idx = rng.integers(0, len(train), batch_size)
            loss = _lm_loss(model, to_torch(rows.batch(idx)), len(tokenizer), split=split)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            if on_step is not None:
                on_step(step + 1)
        train_s = time.perf_counter() - start
        acc = _score(model, tokenizer, held_out, max_length, max_new_tokens, fmt, extractor)
        acc.update(
            name=spec.name,
            parameters=count_parameters(model),
            train_steps=spec.train_steps,
            train_s=round(train_s, 1),
        )
        acc = json.loads(json.dumps(acc))  # the same (string) keys as when read back from the cache
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        hf_logging.disable_progress_bar()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "accuracy.json").write_text(json.dumps(acc, indent=2))
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        return LadderEntry(spec.name, out_dir, acc, acc["parameters"])


@dataclass(frozen=True)
class _TokenRows:
    """Every training example tokenized once: ``batch(idx)`` is what
    ``encode_examples(tokenizer, [examples[i] for i in idx], max_length, fmt)`` returns (the
    same ids, padding and loss mask; a test checks it) without tokenizing text every step."""

    rows: list[tuple[list[int], int]]  # (ids incl. the end token, truncated; n prompt tokens)
    pad: int

    @classmethod
    def encode(
        cls,
        tokenizer: PreTrainedTokenizerBase,
        examples: Sequence[Example],
        max_length: int | None,
        fmt: PromptFormat,
    ) -> _TokenRows:
        rows = tokenize_rows(tokenizer, examples, fmt)
        if max_length is not None:
            rows = [(ids[:max_length], n) for ids, n in rows]
        return cls(rows, pad_id(tokenizer))

    def batch(self, idx: np.ndarray) -> Encoded:
        picked = [self.rows[i] for i in idx]
        return pad_rows(picked, self.pad, np.arange(len(picked), dtype=np.int64))


def _score(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    held_out: list[Example],
    max_length: int | None,
    max_new_tokens: int | None,
    fmt: PromptFormat,
    extractor: AnswerExtractor | None,
) -> dict:
    """Held-out exact-match accuracy (greedy generation) and, at a real vocabulary, the
    held-out token loss (tiny models there score ~0 accuracy; the loss still ranks them)."""
    start = time.perf_counter()
    acc = evaluate_accuracy(
        model, tokenizer, held_out, max_new_tokens=max_new_tokens, fmt=fmt, extractor=extractor
    )
    acc.pop("predictions", None)  # the ladder keeps scores, not generations
    acc["eval_s"] = round(time.perf_counter() - start, 1)
    if len(tokenizer) > _SMALL_VOCAB:
        acc.update(held_out_loss(model, tokenizer, held_out, max_length=max_length, fmt=fmt))
    return acc


# The embedded task's character tokenizer is tiny; its ladders report accuracy only.
_SMALL_VOCAB = 1024


def _check_entry_dir(out_dir: Path) -> None:
    """``out_dir`` and its sibling ``<name>.tmp`` get deleted and rewritten: refuse anything but a
    plain entry of its parent (no ``..``), so nothing outside the cache can be touched."""
    if ".." in out_dir.parts or out_dir.name in ("", "."):
        raise ValueError(f"train_teacher: out_dir={out_dir} is not a plain cache entry directory")


def _cache_entry(cache: Path, spec: TeacherSpec, key: str) -> Path:
    """``<cache>/<name>-<key>``; a name that would leave ``cache`` is refused (the config already
    refuses it; this guards configs built without validation)."""
    try:
        check_path_name(spec.name, "teacher name")
    except ValueError as err:
        raise ConfigError(f"teachers.ladder: {err}") from None
    out = cache / f"{spec.name}-{key}"
    _check_entry_dir(out)
    return out


def _cached_entry(name: str, out: Path) -> LadderEntry | None:
    """The cache entry at ``out`` when it is complete (written by rename, so never half)."""
    acc = _read_accuracy(out)
    if acc is None or not (out / "config.json").is_file():
        return None
    return LadderEntry(name, out, acc, acc.get("parameters"))


def _read_accuracy(path: Path) -> dict | None:
    f = path / "accuracy.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _fingerprint(path: Path) -> list:
    """What identifies a model directory's content cheaply: its files' names, sizes, mtimes."""
    if not path.is_dir():
        return [str(path)]
    return [
        [p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]


def _score_loaded(
    config: Config,
    spec: TeacherSpec,
    path: Path,
    held_out: list[Example],
    cache: Path,
    *,
    max_new_tokens: int | None,
    progress: bool,
) -> LadderEntry:
    """A teacher given by ``path``, scored on the held-out set like a built one (once: the
    scores are cached by the directory's fingerprint and the held-out set)."""
    key = _digest(
        [
            LADDER_VERSION,
            str(path.resolve()),
            _fingerprint(path),
            examples_digest(held_out),
            max_new_tokens,
            config.teachers.dtype,
            [config.data.chat_template, config.data.system_prompt],
        ]
    )[:12]
    check_path_name(spec.name, "teacher name")
    out = cache / "scores" / f"{spec.name}-{key}.json"
    if out.is_file():
        acc = json.loads(out.read_text())
        return LadderEntry(spec.name, path, acc, acc.get("parameters"))
    tokenizer = load_tokenizer(path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_causal_lm(path, config.teachers.dtype).to(device)  # type: ignore[arg-type]
    acc = _score(
        model,
        tokenizer,
        held_out,
        config.train.max_length,
        max_new_tokens,
        PromptFormat.from_config(config),
        AnswerExtractor.from_config(config),
    )
    acc.update(name=spec.name, parameters=count_parameters(model), path=str(path))
    acc = json.loads(json.dumps(acc))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(acc, indent=2))
    tmp.replace(out)
    if progress:
        tqdm.write(_announce(spec.name, acc))
    return LadderEntry(spec.name, path, acc, acc["parameters"])


def _announce(name: str, acc: dict) -> str:
    loss = f", held-out loss {acc['loss']:.3f}" if "loss" in acc else ""
    took = f" ({acc['train_s']:.0f} s)" if "train_s" in acc else ""
    return (
        f"teacher {name}: {acc['parameters']:,} params, held-out accuracy "
        f"{acc['accuracy']:.3f}{loss}{took}"
    )


def ensure_ladder(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    held_out: list[Example],
    *,
    progress: bool = True,
    score_paths: bool = True,
    max_new_tokens: int | None = None,
    workers: int | None = None,
) -> list[LadderEntry]:
    """Every teacher of the ladder, weakest first, trained and cached where needed.

    Built teachers are sized for ``tokenizer`` (the run's shared one) unless their spec names
    its own ``tokenizer``. Teachers given by ``path`` are scored on ``held_out`` too when
    ``score_paths`` (on the driver, on a GPU when it has one; cached), else taken with the
    ``accuracy.json`` their directory may hold.

    Missing teachers train at once in ``workers`` processes (``ladder_pool``; default: one per
    CPU and at most one per teacher when they have enough steps to be worth it, or
    $CLPD_LADDER_WORKERS); with one, here, one after the other."""
    cache = default_cache_dir(config) / "teachers"
    entries: list[LadderEntry | None] = []
    jobs: list[tuple[int, TeacherJob]] = []  # (ladder position, job) of each missing teacher
    for spec in config.teachers.ladder:
        if spec.path:
            path = Path(spec.path).expanduser()
            if not path.exists():
                raise ConfigError(
                    f"teachers.ladder[{spec.name}].path: {path} does not exist; "
                    "give a save_pretrained directory, or drop 'path' to train a tiny teacher"
                )
            own = _read_accuracy(path)
            if own is not None or not score_paths:
                parameters = own.get("parameters") if own else None
                entries.append(LadderEntry(spec.name, path, own, parameters))
            else:
                entries.append(
                    _score_loaded(
                        config,
                        spec,
                        path,
                        held_out,
                        cache,
                        max_new_tokens=max_new_tokens,
                        progress=progress,
                    )
                )
            continue
        spec = capped(spec, config.teachers.max_train_steps)
        own_tok = spec.tokenizer and spec.tokenizer != config.student.tokenizer
        tok = load_tokenizer(spec.tokenizer) if own_tok else tokenizer  # type: ignore[arg-type]
        key = teacher_cache_key(config, spec, (train, held_out, tok))
        out = _cache_entry(cache, spec, key)
        cached = _cached_entry(spec.name, out)
        if cached is not None:
            entries.append(cached)
            continue
        jobs.append((len(entries), TeacherJob(spec, tok, out, _max_length(config, spec))))
        entries.append(None)
    if jobs:
        trained = _train_missing(
            [job for _, job in jobs],
            worker_count([job.spec.train_steps for _, job in jobs], workers),
            train=train,
            held_out=held_out,
            progress=progress,
            batch_size=config.teachers.batch_size,
            seed=config.seed,
            max_new_tokens=max_new_tokens,
            fmt=PromptFormat.from_config(config),
            extractor=AnswerExtractor.from_config(config),
        )
        for (at, _), entry in zip(jobs, trained, strict=True):
            entries[at] = entry
    return [e for e in entries if e is not None]


def _train_missing(
    jobs: list[TeacherJob],
    workers: int,
    *,
    train: list[Example],
    held_out: list[Example],
    progress: bool,
    **common: Any,
) -> list[LadderEntry]:
    """The missing teachers, trained in ``workers`` processes, or here when that is 1."""
    if workers > 1:
        return train_in_processes(
            jobs,
            workers,
            train=train,
            held_out=held_out,
            progress=progress,
            announce=_announce,
            **common,
        )
    done = []
    for job in jobs:
        entry = train_teacher(
            job.spec,
            job.tokenizer,
            train,
            held_out,
            out_dir=job.out_dir,
            progress=progress,
            max_length=job.max_length,
            **common,
        )
        if progress and entry.accuracy:
            tqdm.write(_announce(job.spec.name, entry.accuracy))
            sys.stdout.flush()  # at once in a log too (tqdm.write does not flush)
        done.append(entry)
    return done


def accuracy_table(entries: list[LadderEntry]) -> str:
    """A markdown table: teacher x difficulty held-out accuracy (and held-out token loss, for
    ladders that report it)."""
    diffs = sorted({int(k) for e in entries if e.accuracy for k in e.accuracy["by_difficulty"]})
    with_loss = any(e.accuracy and "loss" in e.accuracy for e in entries)
    lcol = " loss |" if with_loss else ""
    head = f"| teacher | params | all |{lcol} " + " | ".join(f"k={d}" for d in diffs) + " |"
    rows = [head, "|" + "---|" * (3 + with_loss + len(diffs))]
    for e in entries:
        if not e.accuracy:
            rows.append(f"| {e.name} | ? | n/a |" + " |" * (with_loss + len(diffs)))
            continue
        by = {int(k): v for k, v in e.accuracy["by_difficulty"].items()}
        cells = " | ".join(f"{by.get(d, float('nan')):.2f}" for d in diffs)
        loss = e.accuracy.get("loss")
        lcell = (f" {loss:.3f} |" if loss is not None else " - |") if with_loss else ""
        params = f"{e.parameters:,}" if e.parameters is not None else "?"
        rows.append(f"| {e.name} | {params} | {e.accuracy['accuracy']:.2f} |{lcell} {cells} |")
    return "\n".join(rows)
