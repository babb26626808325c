"""check_same_vocab: identical token-to-id maps pass; any difference names both sizes and the fix."""

from __future__ import annotations

import re

import pytest

from clpd_ray.config import ModelSpec
from clpd_ray.data.task import TASK_ALPHABET
from clpd_ray.data.tokenizer import build_char_tokenizer, load_tokenizer
from clpd_ray.data.vocab import check_same_vocab
from clpd_ray.distill.models import build_model
from clpd_ray.errors import ClpdError, TokenizerMismatchError


def test_same_tokenizer_passes():
    tok = build_char_tokenizer()
    check_same_vocab(tok, tok)
    check_same_vocab(tok, build_char_tokenizer())


def test_saved_and_reloaded_tokenizer_passes(tmp_path):
    tok = build_char_tokenizer()
    tok.save_pretrained(tmp_path)
    check_same_vocab(tok, load_tokenizer(tmp_path))
    check_same_vocab(load_tokenizer(tmp_path), tok)


def test_padded_model_embedding_is_not_a_tokenizer_property():
    # A teacher whose embedding has more rows than the tokenizer still shares the tokenizer.
    tok = build_char_tokenizer()
    model = build_model(ModelSpec(n_layer=1, n_embd=16, n_head=2), tok)
    model.resize_token_embeddings(32)
    assert model.get_input_embeddings().weight.shape[0] == 32 > len(tok)
    check_same_vocab(tok, tok)


def test_different_sizes_raise_naming_both_sizes():
    student = build_char_tokenizer()
    teacher = build_char_tokenizer(TASK_ALPHABET + "xyz")
    with pytest.raises(TokenizerMismatchError) as info:
        check_same_vocab(student, teacher, student_name="stu", teacher_name="t-large")
    msg = str(info.value)
    assert f"{len(teacher)} tokens" in msg
    assert f"{len(student)} tokens" in msg
    assert "t-large" in msg and "stu" in msg
    assert "sequence" in msg
    assert "'x'" in msg  # an example of a differing token
    assert isinstance(info.value, ClpdError)


def test_same_size_but_different_ids_raise():
    student = build_char_tokenizer()
    teacher = build_char_tokenizer(TASK_ALPHABET[::-1])  # same tokens, other ids
    assert len(student) == len(teacher)
    with pytest.raises(TokenizerMismatchError, match="sequence") as info:
        check_same_vocab(student, teacher)
    msg = str(info.value)
    assert len(re.findall(rf"\b{len(student)} tokens", msg)) == 2
    assert "teacher" in msg and "student" in msg


def test_one_token_swapped_raises():
    student = build_char_tokenizer()
    teacher = build_char_tokenizer(TASK_ALPHABET.replace("?", "!"))
    with pytest.raises(TokenizerMismatchError) as info:
        check_same_vocab(student, teacher)
    assert "'!'" in str(info.value) or "'?'" in str(info.value)
