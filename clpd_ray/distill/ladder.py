"""The teacher ladder: train (or load) teachers of increasing capacity and cache them.

For the embedded task each teacher in ``config.teachers.ladder`` without a ``path`` is trained
locally with plain supervised learning and cached as a ``save_pretrained`` directory
(safetensors + tokenizer + ``accuracy.json``), keyed by the task and the teacher's settings, so a
second run loads it instantly. Teachers with a ``path`` are loaded as they are.

    <cache_dir>/teachers/<name>-<key>/
        config.json  model.safetensors  tokenizer.json ...  accuracy.json
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from clpd_ray.config import Config, TeacherSpec, check_path_name, default_cache_dir
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.example import Example
from clpd_ray.distill.models import build_model, count_parameters
from clpd_ray.distill.training import evaluate_accuracy, lm_loss, make_optimizer, to_torch
from clpd_ray.errors import ConfigError

__all__ = ["LadderEntry", "ensure_ladder", "teacher_cache_key", "train_teacher"]

# Bump when the task, the tokenizer or the training recipe changes, to invalidate old caches.
LADDER_VERSION = 1


@dataclass(frozen=True)
class LadderEntry:
    name: str
    path: Path  # a save_pretrained directory (model + tokenizer)
    accuracy: dict | None  # accuracy.json contents, None for external teachers without one
    parameters: int | None = None


def teacher_cache_key(config: Config, spec: TeacherSpec) -> str:
    payload = {
        "version": LADDER_VERSION,
        "task": config.task.model_dump(mode="json"),
        "teacher": spec.model_dump(mode="json", exclude={"name"}),
        "batch_size": config.teachers.batch_size,
        "seed": config.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


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
) -> LadderEntry:
    """Train one teacher on ``train``, measure it on ``held_out``, write it atomically to ``out_dir``."""
    _check_entry_dir(out_dir)
    model = build_model(spec, tokenizer, seed=seed)
    model.train()
    opt, sched = make_optimizer(
        model, spec.lr, spec.train_steps, warmup=min(100, spec.train_steps // 10)
    )
    rng = np.random.default_rng([seed, 7])
    start = time.perf_counter()
    bar = tqdm(
        range(spec.train_steps), desc=f"train {spec.name}", disable=not progress, leave=False
    )
    for _ in bar:
        idx = rng.integers(0, len(train), batch_size)
        batch = to_torch(encode_examples(tokenizer, [train[i] for i in idx]))
        loss = lm_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    train_s = time.perf_counter() - start
    acc = evaluate_accuracy(model, tokenizer, held_out)
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


def _read_accuracy(path: Path) -> dict | None:
    f = path / "accuracy.json"
    return json.loads(f.read_text()) if f.is_file() else None


def ensure_ladder(
    config: Config,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Example],
    held_out: list[Example],
    *,
    progress: bool = True,
) -> list[LadderEntry]:
    """Every teacher of the ladder, weakest first, trained and cached where needed."""
    cache = default_cache_dir(config) / "teachers"
    entries = []
    for spec in config.teachers.ladder:
        if spec.path:
            path = Path(spec.path).expanduser()
            if not path.exists():
                raise ConfigError(
                    f"teachers.ladder[{spec.name}].path: {path} does not exist; "
                    "give a save_pretrained directory, or drop 'path' to train a tiny teacher"
                )
            entries.append(LadderEntry(spec.name, path, _read_accuracy(path)))
            continue
        if config.data.path:
            raise ConfigError(
                f"teachers.ladder[{spec.name}] has no 'path', but data.path is set: tiny teachers "
                "are only trained for the embedded task. Give each teacher a model path."
            )
        out = _cache_entry(cache, spec, teacher_cache_key(config, spec))
        acc = _read_accuracy(out)
        if acc is not None and (out / "config.json").is_file():
            entries.append(LadderEntry(spec.name, out, acc, acc.get("parameters")))
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        entry = train_teacher(
            spec,
            tokenizer,
            train,
            held_out,
            batch_size=config.teachers.batch_size,
            seed=config.seed,
            out_dir=out,
            progress=progress,
        )
        if progress and entry.accuracy:
            tqdm.write(
                f"teacher {spec.name}: {entry.parameters:,} params, held-out accuracy "
                f"{entry.accuracy['accuracy']:.3f} ({entry.accuracy['train_s']:.0f} s)"
            )
        entries.append(entry)
    return entries


def accuracy_table(entries: list[LadderEntry]) -> str:
    """A markdown table: teacher x difficulty held-out accuracy."""
    diffs = sorted({int(k) for e in entries if e.accuracy for k in e.accuracy["by_difficulty"]})
    head = "| teacher | params | all | " + " | ".join(f"k={d}" for d in diffs) + " |"
    rows = [head, "|" + "---|" * (3 + len(diffs))]
    for e in entries:
        if not e.accuracy:
            rows.append(f"| {e.name} | ? | n/a |" + " |" * len(diffs))
            continue
        by = {int(k): v for k, v in e.accuracy["by_difficulty"].items()}
        cells = " | ".join(f"{by.get(d, float('nan')):.2f}" for d in diffs)
        rows.append(
            f"| {e.name} | {e.parameters or 0:,} | {e.accuracy['accuracy']:.2f} | {cells} |"
        )
    return "\n".join(rows)
