"""Tokenizers: the embedded task's character tokenizer, and loading any Hugging Face tokenizer.

The embedded tokenizer is a real ``PreTrainedTokenizerFast`` (a WordLevel model over single
characters) saved with ``save_pretrained``, so the code path that loads it with
``AutoTokenizer.from_pretrained`` is the same one that loads a hub or local tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from clpd_ray.data.task import TASK_ALPHABET
from clpd_ray.errors import ModelLoadError

__all__ = ["SPECIAL_TOKENS", "build_char_tokenizer", "load_tokenizer"]

SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def build_char_tokenizer(alphabet: str = TASK_ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character of ``alphabet``, plus pad, eos and unk."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "right"
    return tok


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer by local path or hub id; ensure it has a pad token (eos as pad)."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:  # transformers raises OSError, ValueError, ... by case
        raise ModelLoadError(
            f"cannot load a tokenizer from {path}: {err.__class__.__name__}: {err}. "
            "Pass a directory written by save_pretrained or a hub id available offline."
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
