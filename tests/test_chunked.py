"""Chunked output projection and loss (clpd_ray.distill.chunked) against unchunked references.

The reference is the (B, T, V) masked loss of clpd_ray.distill.losses, itself pinned to a numpy
float64 reference in test_losses.py, applied to logits computed in one piece.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax

from clpd_ray.distill.chunked import (
    FlatTargets,
    chunked_distill_loss,
    chunked_sum,
    output_head,
    used_width,
)
from clpd_ray.distill.losses import hard_ce_loss, sparse_kd_loss

KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
TAILS = ("renormalise", "zero", "tail_bucket")


def make_case(seed: int, n: int = 13, h: int = 6, v: int = 17, padded: int = 20, k: int = 5):
    """Hidden states (N, H), a head (H -> padded rows), two teachers' top-k over v real ids."""
    rng = np.random.default_rng(seed)
    hidden = torch.tensor(rng.standard_normal((n, h)), dtype=torch.float32)
    head = torch.nn.Linear(h, padded, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor(2.0 * rng.standard_normal((padded, h))))
    teachers = []
    for temperature, weight in ((1.0, 0.7), (2.0, 0.3)):
        logp = log_softmax(3.0 * rng.standard_normal((n, v)) / temperature, axis=-1)
        ids = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
        lp = np.take_along_axis(logp, ids, axis=-1).astype(np.float32)
        teachers.append((torch.tensor(lp), torch.tensor(ids), temperature, weight))
    labels = torch.tensor(rng.integers(0, v, size=n))
    return hidden, head, teachers, labels


def reference(hidden, head, teachers, labels, v, ce_weight, **kw):
    """KD sum + ce_weight * CE sum from whole (1, N, V) logits and the masked losses."""
    logits = head(hidden)[:, :v].unsqueeze(0)  # (1, N, V)
    mask = torch.ones(logits.shape[:2], dtype=torch.bool)
    kd = sum(
        w * sparse_kd_loss(logits, lp[None], ids[None], mask, temperature=t, reduction="sum", **kw)
        for lp, ids, t, w in teachers
    )
    ce = hard_ce_loss(logits, labels[None], mask, reduction="sum")
    return kd, ce, kd + ce_weight * ce


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_value_and_gradients(kind, tail, chunk):
    hidden, head, teachers, labels = make_case(10 * KINDS.index(kind) + TAILS.index(tail))
    kw = {"kind": kind, "tail": tail, "beta": 0.3, "alpha": 0.2, "scale_by_t2": True}
    h = hidden.clone().requires_grad_(True)
    ref_kd, ref_ce, ref_total = reference(h, head, teachers, labels, 17, 0.4, **kw)
    ref_grads = grads_of(ref_total, h, head.weight)

    h2 = hidden.clone().requires_grad_(True)
    flat = [FlatTargets(lp, ids, t, w) for lp, ids, t, w in teachers]
    kd, ce = chunked_distill_loss(h2, head, flat, labels, vocab_size=17, chunk=chunk, **kw)
    grads = grads_of(kd + 0.4 * ce, h2, head.weight)

    torch.testing.assert_close(kd, ref_kd.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)


def test_no_labels_means_no_ce_and_no_targets_means_ce_only():
    hidden, head, teachers, labels = make_case(1)
    flat = [FlatTargets(lp, ids, t, w) for lp, ids, t, w in teachers]
    kd, ce = chunked_distill_loss(hidden, head, flat, None, vocab_size=17, chunk=5)
    assert ce.item() == 0.0 and kd.item() > 0.0
    kd, ce = chunked_distill_loss(hidden, head, [], labels, vocab_size=17, chunk=5)
    ref = hard_ce_loss(head(hidden)[None, :, :17], labels[None], torch.ones(1, 13, dtype=bool))
    assert kd.item() == 0.0
    torch.testing.assert_close(ce / 13, ref.detach())


def test_padded_rows_are_never_scored():
    # The head has 20 rows, the tokenizer 17: a target id of 18 is an error, not a silent pad.
    hidden, head, teachers, _ = make_case(2)
    lp, ids, t, _ = teachers[0]
    bad = ids.clone()
    bad[0, 0] = 18
    with pytest.raises(ValueError, match=r"student vocabulary has 17 ids"):
        chunked_distill_loss(hidden, head, [FlatTargets(lp, bad, t)], None, vocab_size=17, chunk=4)


def test_empty_positions_give_zero_with_a_graph():
    _, head, _, _ = make_case(3)
    h = torch.zeros((0, 6), requires_grad=True)
    empty = FlatTargets(torch.zeros((0, 5)), torch.zeros((0, 5), dtype=torch.int64), 1.0)
    kd, ce = chunked_distill_loss(
        h, head, [empty], torch.zeros(0, dtype=torch.int64), vocab_size=17, chunk=4
    )
    assert kd.item() == 0.0 and ce.item() == 0.0
    (kd + ce).backward()
    assert head.weight.grad is not None and not head.weight.grad.any()


def test_the_graph_holds_no_full_logits():
    """Checkpointed chunks: what autograd keeps for the backward is far below one (N x V) copy."""
    n, v = 64, 4000
    hidden, head, teachers, labels = make_case(4, n=n, h=8, v=v, padded=v, k=8)
    flat = [FlatTargets(lp, ids, t, w) for lp, ids, t, w in teachers]
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    h = hidden.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kd, ce = chunked_distill_loss(h, head, flat, labels, vocab_size=v, chunk=8)
    assert sum(saved) < n * v // 4, sum(saved)
    # The unchunked loss keeps several (N x V) tensors: the hook does see them.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference(hidden.clone().requires_grad_(True), head, teachers, labels, v, 1.0)
    assert sum(saved) > n * v
    (kd + ce).backward()  # and the checkpointed backward runs
    assert h.grad is not None and torch.isfinite(h.grad).all()


def test_chunked_sum_matches_plain_sum_and_rejects_bad_chunk():
    x = torch.arange(10.0, requires_grad=True)
    total = chunked_sum(x, lambda rows, sl: (rows**2).sum(), 3)
    torch.testing.assert_close(total, (x.detach() ** 2).sum())
    total.backward()
    torch.testing.assert_close(x.grad, 2 * x.detach())
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_sum(x, lambda rows, sl: rows.sum(), 0)


def test_used_width():
    attn = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    loss = np.zeros_like(attn, dtype=bool)
    assert used_width(attn, loss) == 3
    assert used_width(np.ones((2, 4)), loss[:, :4]) == 4  # left-padded: last column is real
    assert used_width(np.zeros((1, 5)), np.zeros((1, 5), dtype=bool)) == 1


# ----------------------------------------------------------------------------------------------
# output_head: where the body / projection split is exact, and where it is refused


def _tiny(arch: str, vocab: int = 40):
    from transformers import (
        AutoModelForCausalLM,
        Gemma2Config,
        GPT2Config,
        Qwen3Config,
    )

    common = {"vocab_size": vocab, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 1}
    small = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}
    small |= {"num_key_value_heads": 2, "intermediate_size": 32, "head_dim": 8}
    config = {
        "gpt2": lambda: GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, **common),
        "qwen3": lambda: Qwen3Config(**small, max_position_embeddings=32, **common),
        "gemma2": lambda: Gemma2Config(**small, max_position_embeddings=32, **common),
    }[arch]()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("arch", ["gpt2", "qwen3"])
def test_output_head_split_reproduces_the_logits(arch):
    model = _tiny(arch)
    split = output_head(model)
    assert split is not None
    base, head = split
    ids = torch.tensor([[3, 7, 9, 2, 11]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        torch.testing.assert_close(head(base(input_ids=ids).last_hidden_state), full)


def test_output_head_refuses_soft_capped_and_post_processed_logits():
    gemma = _tiny("gemma2")
    assert gemma.config.final_logit_softcapping is not None
    assert output_head(gemma) is None

    model = _tiny("gpt2")
    plain_forward = model.forward

    def scaled(*args, **kwargs):  # an unknown post-processing step: caught numerically
        out = plain_forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled  # type: ignore[method-assign]
    assert output_head(model) is None
