"""Deep checks of a config before anything runs: data, model paths, tokenizers and lengths.

``clpd validate CONFIG`` runs all of them without loading any weights or starting Ray;
``clpd run`` runs the model-path checks (with the weights' headers) before the workload is built
and the length check before any actor starts (runtime/run.py). Every failure is a
:class:`~clpd_ray.errors.ClpdError` (exit 2) naming the key, the file or model, and the fix::

    data.path / data.eval_path ─▶ files exist, rows map with the preset (workload.load_data)
    model paths ─▶ exist, config.json loads, a causal LM, its tokenizer loads (no weights)
    tokenizers ─▶ token-level KD: one token map for all (padded rows may differ), rows >= tokens
    lengths ─▶ train.max_length, else the longest training row, <= every model's positions
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from clpd_ray.config import Config, ModelSpec
from clpd_ray.data.batching import tokenize_rows
from clpd_ray.data.example import Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.tokenizer import build_char_tokenizer, load_tokenizer
from clpd_ray.distill.models import required_tokenizer_source
from clpd_ray.errors import ConfigError, ModelLoadError

__all__ = [
    "ModelInfo",
    "check_causal_lm",
    "check_lengths",
    "check_rows",
    "download_hint",
    "inspect_models",
    "load_model_config",
    "shared_tokenizer",
    "training_length",
]

_FIX = (
    "give a directory written by save_pretrained (config.json + model.safetensors) or a hub id "
    "available offline"
)
# Where a config keeps a model's context length, by architecture family.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class ModelInfo:
    """One model of the config as the checks see it (no weights loaded)."""

    key: str  # the config key naming it: "student.path", "teachers.ladder[t-7b]", ...
    name: str  # "student", "teacher t-7b"
    max_positions: int | None  # its context length; None if its config names none
    rows: int | None  # embedding rows (vocab_size); None: sized for the tokenizer when built
    tokenizer_source: str | None  # where its tokenizer loads from; None: the shared one


def download_hint(path: str | Path, key: str = "the key") -> str:
    """How to get a checkpoint that is not at ``path``: a ``huggingface-cli download`` command
    whose hub id is the path's last two parts (``models/Qwen/Qwen2.5-7B-Instruct``)."""
    p = Path(str(path))
    parts = [x for x in p.parts if x not in ("/", ".", "..", "~")]
    repo = "/".join(parts[-2:]) if len(parts) >= 2 else f"<org>/{p.name}"
    return (
        f"download it with `huggingface-cli download {repo} --local-dir {path}` (if {repo} is "
        f"its hub id; `hf download` in newer huggingface_hub), or set {key} to where the "
        f"checkpoint is"
    )


def _looks_local(path: str) -> bool:
    local = Path(path).expanduser()
    return local.exists() or local.is_absolute() or path.startswith((".", "~"))


def load_model_config(key: str, path: str | Path) -> Any:
    """The ``PretrainedConfig`` at ``path`` (config.json only, no weights), or a ModelLoadError
    naming ``key``, the path and how to get the model."""
    from transformers import AutoConfig

    text = str(path)
    local = Path(text).expanduser()
    if _looks_local(text) or re.fullmatch(r"[\w.-]+(/[\w.-]+){2,}", text):
        # A local path (a hub id is exactly org/name): it must be here.
        if not local.exists():
            raise ModelLoadError(f"{key}: {path} does not exist; {download_hint(text, key)}")
        if not (local / "config.json").is_file():
            raise ModelLoadError(
                f"{key}: {path} has no config.json, so it is not a saved model; {_FIX}"
            )
    try:
        model_config = AutoConfig.from_pretrained(text)
    except Exception as err:  # transformers raises OSError, ValueError, ... by case
        why = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelLoadError(
            f"{key}: cannot load a model from {path} ({type(err).__name__}: {why}); {_FIX}"
        ) from None
    check_causal_lm(key, path, model_config)
    return model_config


def check_causal_lm(key: str, path: str | Path, model_config: Any) -> None:
    """Distillation needs next-token logits: refuse an encoder-decoder or encoder checkpoint
    (a T5 directory, say) before any actor tries to load it."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(model_config, "model_type", None)
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(
            f"{key}: {path} is a {kind!r} model, which AutoModelForCausalLM cannot load: "
            "teachers and the student must be decoder-only causal LMs (GPT-2, Llama, Qwen, ...); "
            "give such a checkpoint"
        )


def _positions(model_config: Any) -> int | None:
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else None
    for cfg in (text, model_config):
        for k in _POSITION_KEYS:
            v = getattr(cfg, k, None)
            if isinstance(v, int) and v > 0:
                return v
    return None


def _info(key: str, name: str, spec: ModelSpec, load_tokenizers: bool) -> ModelInfo:
    if spec.path:
        model_config = load_model_config(key, spec.path)
        if load_tokenizers:
            load_tokenizer(spec.path)  # ModelLoadError naming the path
        rows = getattr(model_config.get_text_config(), "vocab_size", None)
        return ModelInfo(key, name, _positions(model_config), rows, spec.path)
    if spec.tokenizer and load_tokenizers:
        _load_named_tokenizer(f"{key}.tokenizer", spec.tokenizer)
    return ModelInfo(key, name, spec.max_positions, spec.vocab_size, spec.tokenizer)


def _load_named_tokenizer(key: str, source: str) -> PreTrainedTokenizerBase:
    local = Path(source).expanduser()
    if _looks_local(source) and not local.exists():
        raise ModelLoadError(
            f"{key}: {source} does not exist; put a tokenizer directory there (tokenizer.json + "
            "tokenizer_config.json, e.g. the files of any Qwen2.5/Qwen3 checkpoint) or point the "
            "key at one"
        )
    try:
        return load_tokenizer(source)
    except ModelLoadError as err:
        raise ModelLoadError(f"{key}: {err}") from None


def inspect_models(config: Config, *, load_tokenizers: bool = True) -> list[ModelInfo]:
    """Every model of the config, student first: paths exist and their config.json (and, with
    ``load_tokenizers``, tokenizer) load; built models' tokenizers load. No weights are read."""
    student_key = "student.path" if config.student.path else "student"
    named: list[tuple[str, str, ModelSpec]] = [(student_key, "student", config.student)]
    for t in config.teachers.ladder:
        named.append(
            (f"teachers.ladder[{t.name}]" + (".path" if t.path else ""), f"teacher {t.name}", t)
        )
    infos: list[ModelInfo] = []
    missing: list[str] = []
    for key, name, spec in named:
        try:
            infos.append(_info(key, name, spec, load_tokenizers))
        except ModelLoadError as err:
            if not (spec.path and "does not exist" in str(err)):
                raise
            missing.append(str(err))
    if len(missing) == 1:
        raise ModelLoadError(missing[0])
    if missing:  # every absent checkpoint at once: one download session, not one per try
        raise ModelLoadError(f"{len(missing)} models are missing:\n  " + "\n  ".join(missing))
    return infos


def shared_tokenizer(config: Config) -> PreTrainedTokenizerBase:
    """The run's shared tokenizer, loaded (nothing is written; the workload keeps a copy)."""
    found = required_tokenizer_source(config)
    if found is None:
        return build_char_tokenizer()
    key, source = found
    return _load_named_tokenizer(key, source)


def check_rows(infos: list[ModelInfo], tokenizer: PreTrainedTokenizerBase) -> None:
    """Every model sharing ``tokenizer`` has an embedding row per token (more rows are padding:
    Qwen2.5-7B's 152,064 and the small ones' 151,936 serve the same 151,665-token map)."""
    n = len(tokenizer)
    for m in infos:
        if m.rows is not None and m.rows < n:
            raise ModelLoadError(
                f"{m.key}: {m.name} has {m.rows:,} embedding rows but the shared tokenizer has "
                f"{n:,} tokens, so ids >= {m.rows:,} have no row: it was not trained with this "
                "tokenizer; use a checkpoint of the same family, or distill.objective: sequence"
            )


def training_length(
    config: Config, tokenizer: PreTrainedTokenizerBase, examples: list[Example]
) -> tuple[int, str]:
    """(tokens, where the figure comes from): ``train.max_length``, else the longest of
    ``examples`` (prompt + target + end token, in the run's prompt format)."""
    if config.train.max_length is not None:
        return config.train.max_length, f"train.max_length={config.train.max_length}"
    rows = tokenize_rows(tokenizer, examples, PromptFormat.from_config(config))
    longest = max((len(ids) for ids, _ in rows), default=0)
    return longest, f"the longest training example ({longest} tokens; train.max_length is unset)"


def check_lengths(infos: list[ModelInfo], length: int, source: str) -> None:
    """Every model can read ``length`` positions, else a ConfigError naming the model, its limit
    and the fix (today's failure would be an IndexError at the first step)."""
    for m in infos:
        if m.max_positions is not None and length > m.max_positions:
            fix = f"set train.max_length: {m.max_positions} (or less)"
            if m.key.endswith(".path"):
                fix += f" so that examples fit {m.name}"
            else:
                fix += f", or raise {m.key}.max_positions to at least {length}"
            raise ConfigError(
                f"{m.key}: {m.name} reads at most {m.max_positions} positions "
                f"(max_position_embeddings) but training rows have up to {length} tokens "
                f"({source}); {fix}; longer examples are then truncated or dropped "
                "(train.overlong)"
            )
