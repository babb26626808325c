"""Causal language models: load any Hugging Face model, or build a tiny one from a config.

Tiny models (GPT-2, Llama or Qwen2 architectures) are what the embedded task's teacher ladder and
students are made of; anything ``AutoModelForCausalLM`` can load works in their place.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from clpd_ray.config import ModelSpec
from clpd_ray.errors import ModelLoadError

__all__ = ["build_model", "count_parameters", "load_causal_lm", "make_model"]


def build_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM sized by ``spec`` for ``tokenizer``'s vocabulary."""
    common = {
        "vocab_size": len(tokenizer),
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
        cls = LlamaConfig if spec.arch == "llama" else Qwen2Config
        config = cls(
            num_hidden_layers=spec.n_layer,
            hidden_size=spec.n_embd,
            intermediate_size=4 * spec.n_embd,
            num_attention_heads=spec.n_head,
            num_key_value_heads=spec.n_head,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=True,
            **common,
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return model


def load_causal_lm(path: str | Path) -> PreTrainedModel:
    """Load a causal LM by local path or hub id (safetensors weights preferred)."""
    try:
        return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=None)
    except Exception as err:  # transformers raises OSError, ValueError, ... by case
        raise ModelLoadError(
            f"cannot load a causal LM from {path}: {err.__class__.__name__}: {err}. "
            "Pass a directory written by save_pretrained (config.json + model.safetensors) "
            "or a hub id available offline."
        ) from None


def make_model(
    spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> PreTrainedModel:
    """Load ``spec.path`` when set, else build the tiny architecture ``spec`` describes."""
    return load_causal_lm(spec.path) if spec.path else build_model(spec, tokenizer, seed)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
