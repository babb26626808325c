"""Tokenizer compatibility between teachers and the student, checked before token-level KD.

Same-family models often differ only in padded embedding size (Qwen2.5: 151,936 vs 152,064
rows); that is fine, because logits are sliced to the tokenizer's real size. What must match is
the token-to-id map itself. See docs/losses.md, "Vocabulary checks".
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from clpd_ray.errors import TokenizerMismatchError

__all__ = ["check_same_vocab"]


def _label(tok: PreTrainedTokenizerBase, fallback: str) -> str:
    return getattr(tok, "name_or_path", "") or fallback


def check_same_vocab(
    student: PreTrainedTokenizerBase,
    teacher: PreTrainedTokenizerBase,
    *,
    student_name: str = "student",
    teacher_name: str = "teacher",
) -> None:
    """Raise :class:`TokenizerMismatchError` unless both tokenizers map tokens to the same ids."""
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv == tv:
        return
    differing = (
        sorted(k for k in sv.keys() ^ tv.keys())[:5]
        or sorted(k for k in sv if sv[k] != tv.get(k))[:5]
    )
    raise TokenizerMismatchError(
        f"{teacher_name} tokenizer ({_label(teacher, teacher_name)}, {len(tv)} tokens) and "
        f"{student_name} tokenizer ({_label(student, student_name)}, {len(sv)} tokens) differ "
        f"(e.g. tokens {differing!r}), so token-level KD is impossible; use the same tokenizer "
        "family, or set distill.objective=sequence for sequence-level KD"
    )
