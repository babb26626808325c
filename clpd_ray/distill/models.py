"""Causal language models: load any Hugging Face model, or build a tiny one from a config.

Tiny models (GPT-2, Llama, Qwen2 or Qwen3 architectures) are what the teacher ladders and the
built students are made of; anything ``AutoModelForCausalLM`` can load works in their place. A
built model is sized for a tokenizer: the embedded task's character tokenizer, or a real one
(``ModelSpec.tokenizer``, e.g. a Qwen tokenizer of 151,669 tokens) with its embedding padded to
``ModelSpec.vocab_size`` rows the way Qwen checkpoints pad theirs (151,936).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen3Config,
)

from clpd_ray.config import Config, ModelSpec
from clpd_ray.errors import ConfigError, ModelLoadError

__all__ = [
    "DTYPES",
    "build_model",
    "count_parameters",
    "load_causal_lm",
    "make_model",
    "required_tokenizer_source",
    "shared_tokenizer_source",
]

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
# The weight dtypes a loaded model may be given ("auto": as the checkpoint stores them).
DTYPES: dict[str, torch.dtype | str] = {
    "auto": "auto",
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def _rows(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> int:
    """Embedding rows: ``spec.vocab_size`` (padding past the tokenizer), else the tokenizer's."""
    n = len(tokenizer)
    if spec.vocab_size is None:
        return n
    if spec.vocab_size < n:
        raise ConfigError(
            f"vocab_size={spec.vocab_size} is smaller than the tokenizer ({n} tokens): every "
            f"token needs an embedding row; set vocab_size >= {n} (Qwen tokenizers: 151936) or "
            "drop it"
        )
    return spec.vocab_size


def build_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM sized by ``spec`` for ``tokenizer``'s vocabulary."""
    rows = _rows(spec, tokenizer)
    common = {
        "vocab_size": rows,
        "bos_token_id": tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config: PretrainedConfig
    if spec.arch == "gpt2":
        config = GPT2Config(
            n_layer=spec.n_layer,
            n_embd=spec.n_embd,
            n_head=spec.n_head,
            n_positions=spec.max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    else:
        cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[spec.arch]
        extra = {"head_dim": spec.n_embd // spec.n_head} if spec.arch == "qwen3" else {}
        config = cls(
            num_hidden_layers=spec.n_layer,
            hidden_size=spec.n_embd,
            intermediate_size=4 * spec.n_embd,
            num_attention_heads=spec.n_head,
            num_key_value_heads=spec.n_head,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=True,
            **extra,
            **common,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if rows > len(tokenizer):
        # Padded rows are no token: generation must never pick one (a trained checkpoint learns
        # that; a freshly built model would not).
        model.generation_config.suppress_tokens = list(range(len(tokenizer), rows))
    return model


def load_causal_lm(path: str | Path, dtype: Dtype = "float32") -> PreTrainedModel:
    """Load a causal LM by local path or hub id (safetensors weights preferred).

    ``dtype`` sets the weights' precision: float32 by default (transformers 5 would otherwise
    keep a bf16 checkpoint in bf16), or "auto" for the dtype the checkpoint stores.
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        return AutoModelForCausalLM.from_pretrained(
            str(path), use_safetensors=None, dtype=DTYPES[dtype]
        )
    except Exception as err:  # transformers raises OSError, ValueError, ... by case
        raise ModelLoadError(
            f"cannot load a causal LM from {path}: {err.__class__.__name__}: {err}. "
            "Pass a directory written by save_pretrained (config.json + model.safetensors) "
            "or a hub id available offline."
        ) from None


def make_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0, dtype: Dtype = "float32"
) -> PreTrainedModel:
    """Load ``spec.path`` when set (in ``dtype``), else build the tiny architecture ``spec``
    describes (float32)."""
    return load_causal_lm(spec.path, dtype) if spec.path else build_model(spec, tokenizer, seed)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shared_tokenizer_source(config: Config) -> tuple[str, str] | None:
    """(config key, path or hub id) of the run's shared tokenizer, or None for the embedded
    task's character tokenizer (or for external data with no tokenizer named).

    The student's checkpoint, else the tokenizer a built student is sized for
    (``student.tokenizer``), else, for external data, the strongest teacher checkpoint. Every
    teacher is checked against it before token-level KD.
    """
    if config.student.path:
        return "student.path", config.student.path
    if config.student.tokenizer:
        return "student.tokenizer", config.student.tokenizer
    if config.data.path is None:
        return None  # the embedded task's own character tokenizer
    for spec in reversed(config.teachers.ladder):
        if spec.path:
            return f"teachers.ladder[{spec.name}].path", spec.path
    return None


def required_tokenizer_source(config: Config) -> tuple[str, str] | None:
    """:func:`shared_tokenizer_source`, or ConfigError for external data with no tokenizer."""
    found = shared_tokenizer_source(config)
    if found is None and config.data.path is not None:
        raise ConfigError(
            "data.path is set but no tokenizer is: an external dataset needs a real one; set "
            "student.tokenizer (a tokenizer directory or hub id the built student is sized "
            "for), student.path, or teachers.ladder[*].path"
        )
    return found
