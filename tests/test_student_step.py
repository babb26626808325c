"""StudentTrainer.train_step in-process (no Ray): chunked loss, gradient accumulation, precision.

The reference step is written out here the way the trainer used to do it: one forward over the
whole batch, full (B, T, V) logits, the masked sparse loss of clpd_ray.distill.losses, clip, AdamW.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from clpd_ray.config import load_config
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.task import generate_examples
from clpd_ray.data.tokenizer import build_char_tokenizer
from clpd_ray.distill.losses import hard_ce_loss, sparse_kd_loss
from clpd_ray.distill.models import build_model
from clpd_ray.distill.training import make_optimizer
from clpd_ray.errors import DivergedError
from clpd_ray.messages import Batch, GeneratedBatch, TeacherTargets
from clpd_ray.runtime.actors.student import StudentTrainer

K = 6


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_char_tokenizer().save_pretrained(path)
    return path


def make_config(*overrides: str):
    base = [
        # Llama: no attention key bias, whose gradient is exactly zero in theory, so float noise
        # there, which Adam's 1/sqrt(v) scales up to lr-sized moves, cannot hide a real mismatch.
        "student.arch=llama",
        "student.n_layer=1",
        "student.n_embd=16",
        "student.n_head=2",
        "student.warmup_steps=0",
        "student.lr=0.01",
        "train.batch_size=8",
        "train.total_steps=10",
        "distill.loss=jsd",
        "distill.tail=tail_bucket",
    ]
    return load_config(None, [*base, *overrides])


def make_batch(step: int = 0, n: int = 8) -> Batch:
    enc = encode_examples(build_char_tokenizer(), generate_examples(n, 4, step, "train"))
    return Batch(step, 0, enc.input_ids, enc.attention_mask, enc.loss_mask, np.arange(n))


def make_targets(batch: Batch, vocab: int, seed: int, temperature: float = 1.0) -> TeacherTargets:
    """Compact targets (N, K) float16 / int32 from a random teacher distribution."""
    rng = np.random.default_rng(seed)
    n = batch.num_target_tokens
    logits = torch.tensor(3.0 * rng.standard_normal((n, vocab)), dtype=torch.float32)
    logp = torch.log_softmax(logits / temperature, -1)
    lp, ids = logp.topk(K, -1)
    return TeacherTargets(
        "t", batch.step, lp.half().numpy(), ids.int().numpy(), temperature=temperature
    )


def grads(trainer: StudentTrainer) -> dict[str, torch.Tensor]:
    """The gradients the last step applied (kept until the next step zeroes them)."""
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def weights(trainer: StudentTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict, b: dict, rtol=1e-5, atol=1e-7) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def run_steps(config, tok_dir, steps, sequence=False, teachers=1):
    trainer = StudentTrainer(config, tok_dir)
    results, step_grads = [], []
    for s in range(steps):
        batch = make_batch(s)
        if sequence:
            results.append(trainer.train_step(GeneratedBatch("t", batch)))
        else:
            targets = [make_targets(batch, trainer.vocab_size, 10 * s + i) for i in range(teachers)]
            results.append(trainer.train_step(batch, *targets))
        step_grads.append(grads(trainer))
    return trainer, results, step_grads


# ----------------------------------------------------------------------------------------------
# Gradient accumulation and chunking change the memory, not the update


@pytest.mark.parametrize(
    ("objective", "extra"),
    [("token", ()), ("token", ("distill.ce_weight=0.3",)), ("sequence", ())],
)
def test_grad_accum_gives_the_update_of_one_large_batch(tok_dir, objective, extra):
    seq = objective == "sequence"
    one, r1, g1 = run_steps(make_config(*extra), tok_dir, 2, sequence=seq, teachers=2)
    four, r4, g4 = run_steps(
        make_config("train.grad_accum=4", "distill.loss_chunk=7", *extra),
        tok_dir,
        2,
        sequence=seq,
        teachers=2,
    )
    for a, b in zip(g1, g4, strict=True):
        assert_same(a, b, rtol=1e-5, atol=1e-8)  # gradients ~1e-3: a per-micro-batch mean fails
    # Adam moves each weight by up to lr = 0.01 whatever the gradient's size (m / sqrt(v)), so
    # float noise on gradients near eps = 1e-8 shows up in the weights: allow 1e-3 of one step.
    assert_same(weights(one), weights(four), rtol=1e-5, atol=1e-5)
    for a, b in zip(r1, r4, strict=True):
        assert a.loss == pytest.approx(b.loss, rel=1e-6)
        assert a.kd_loss == pytest.approx(b.kd_loss, rel=1e-6)
        assert a.ce_loss == pytest.approx(b.ce_loss, rel=1e-6)
        assert a.tokens == b.tokens
    if seq:
        assert all(r.kd_loss == 0.0 and r.ce_loss > 0 for r in r1)


def test_step_equals_the_full_logits_reference(tok_dir):
    """Chunked + accumulated step == one forward over full (B, T, V) logits, masked loss, AdamW."""
    config = make_config("train.grad_accum=2", "distill.loss_chunk=5", "distill.ce_weight=0.2")
    trainer = StudentTrainer(config, tok_dir)
    tok = build_char_tokenizer()
    model = build_model(config.student, tok, seed=config.seed)
    model.train()
    opt, sched = make_optimizer(model, config.student.lr, 10, 0, 0.0)
    d = config.distill
    for s in range(2):
        batch = make_batch(s)
        targets = [make_targets(batch, len(tok), 7 * s + i, temperature=1.0 + i) for i in (0, 1)]
        trainer.train_step(batch, *targets, weights=[0.25, 0.75])

        ids = torch.as_tensor(batch.input_ids)
        logits = model(input_ids=ids, attention_mask=torch.as_tensor(batch.attention_mask)).logits
        mask = torch.as_tensor(batch.loss_mask)
        labels = torch.roll(ids, -1, 1)
        loss = 0.0
        for t, w in zip(targets, (0.25, 0.75), strict=True):
            shape = (*mask.shape, K)  # scatter the compact rows back to (B, T, K)
            lp = torch.zeros(shape)
            top = torch.zeros(shape, dtype=torch.int64)
            lp[mask] = torch.tensor(t.logprobs_float32())
            top[mask] = torch.tensor(t.ids, dtype=torch.int64)
            loss = loss + w * sparse_kd_loss(
                logits, lp, top, mask, d.loss, tail=d.tail, beta=d.beta, alpha=d.alpha,
                temperature=t.temperature,
            )  # fmt: skip
        loss = loss + d.ce_weight * hard_ce_loss(logits, labels, mask)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # The gradients each step applied (after clipping): the sharp check.
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert_same(grads(trainer), ref_grads, rtol=1e-5, atol=1e-8)
        opt.step()
        sched.step()
    # Adam turns float noise on gradients near eps into weight noise (see above): 1e-3 of a step.
    assert_same(weights(trainer), {k: v.detach() for k, v in model.state_dict().items()}, atol=1e-5)


def test_dense_layout_targets_give_the_same_step(tok_dir):
    batch = make_batch()
    a = StudentTrainer(make_config(), tok_dir)
    b = StudentTrainer(make_config(), tok_dir)
    compact = make_targets(batch, a.vocab_size, 1)
    shape = (*batch.loss_mask.shape, K)
    lp = np.zeros(shape, np.float32)
    ids = np.zeros(shape, np.int64)
    lp[batch.loss_mask] = compact.logprobs_float32()
    ids[batch.loss_mask] = compact.ids
    ra = a.train_step(batch, compact)
    rb = b.train_step(batch, TeacherTargets("t", 0, lp, ids, 1.0))
    assert ra.loss == rb.loss
    assert_same(weights(a), weights(b), rtol=0, atol=0)


def test_targets_for_another_batch_are_refused(tok_dir):
    trainer = StudentTrainer(make_config(), tok_dir)
    batch = make_batch()
    wrong = make_targets(make_batch(1, n=5), trainer.vocab_size, 0)
    with pytest.raises(ValueError, match=r"teacher 't' sent targets of shape"):
        trainer.train_step(batch, wrong)
    assert trainer.step == 0


def test_gradient_checkpointing_gives_the_same_gradients(tok_dir):
    _, _, plain = run_steps(make_config(), tok_dir, 1)
    ckpt, _, recomputed = run_steps(make_config("student.gradient_checkpointing=true"), tok_dir, 1)
    assert getattr(ckpt.model, "is_activation_checkpointing", None) or (
        ckpt.model.is_gradient_checkpointing
    )
    assert_same(plain[0], recomputed[0], rtol=1e-5, atol=1e-8)


def test_a_qwen3_student_with_padded_embeddings_trains(tok_dir):
    config = make_config(
        "student.arch=qwen3", "student.vocab_size=64", "distill.loss_chunk=16", "distill.tail=zero"
    )
    trainer, results, _ = run_steps(config, tok_dir, 2)
    assert trainer.model.get_output_embeddings().weight.shape[0] == 64 > trainer.vocab_size
    assert trainer._head is not None
    assert all(np.isfinite(r.loss) for r in results)


# ----------------------------------------------------------------------------------------------
# Precision: autocast on the device, fp32 master weights and optimizer state


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(tok_dir, precision):
    _, fp32, _ = run_steps(make_config(), tok_dir, 1)
    trainer, mixed, _ = run_steps(make_config(f"train.precision={precision}"), tok_dir, 2)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for state in trainer.opt.state.values():
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    # Autocast rounds activations, not the loss formula: the step-0 loss is close to fp32's.
    assert mixed[0].loss == pytest.approx(fp32[0].loss, rel=0.02)
    assert all(np.isfinite(r.loss) for r in mixed) and trainer.step == 2
    assert trainer.scaler.is_enabled() == (precision == "fp16")


def test_fp16_overflow_is_a_skipped_step_not_divergence(tok_dir):
    trainer = StudentTrainer(make_config("train.precision=fp16"), tok_dir)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**100)  # fp16 grads overflow
    before = weights(trainer)
    batch = make_batch()
    result = trainer.train_step(batch, make_targets(batch, trainer.vocab_size, 0))
    assert np.isfinite(result.loss) and trainer.step == 1 and trainer.skipped_steps == 1
    assert_same(weights(trainer), before, rtol=0, atol=0)  # the scaler skipped the update
    assert trainer.scaler.get_scale() < 2.0**100


def test_non_finite_loss_still_stops_before_the_update(tok_dir):
    for precision in ("fp32", "bf16", "fp16"):
        trainer = StudentTrainer(make_config(f"train.precision={precision}"), tok_dir)
        before = weights(trainer)
        batch = make_batch()
        bad = make_targets(batch, trainer.vocab_size, 0)
        bad = TeacherTargets("t", 0, bad.logprobs, bad.ids, temperature=1e-45)
        with pytest.raises(DivergedError, match=r"step 0: .* not finite"):
            trainer.train_step(batch, bad)
        assert trainer.step == 0
        assert_same(weights(trainer), before, rtol=0, atol=0)


def test_fp16_checkpoint_carries_the_loss_scale(tok_dir, tmp_path):
    config = make_config("train.precision=fp16")
    a = StudentTrainer(config, tok_dir)
    batch = make_batch()
    a.train_step(batch, make_targets(batch, a.vocab_size, 0))
    a.scaler.update(new_scale=1234.0)
    a.checkpoint(tmp_path / "ckpt")
    b = StudentTrainer(config, tok_dir)
    assert b.restore(tmp_path / "ckpt") == 1
    assert b.scaler.get_scale() == 1234.0
    assert_same(weights(a), weights(b), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# Several steps per call (the executor's train_steps) are the same steps, bit for bit


def test_train_steps_in_one_call_equal_the_steps_one_by_one(tok_dir):
    """A call of mixed steps (a two-teacher mixture with weights, one teacher, a generated
    batch) gives the results and weights of the same train_step calls, bit for bit."""
    config = make_config()
    one, many = StudentTrainer(config, tok_dir), StudentTrainer(config, tok_dir)
    b0, b1, b2 = make_batch(0), make_batch(1), make_batch(2)
    v = one.vocab_size
    t0 = [make_targets(b0, v, 1), make_targets(b0, v, 2)]
    t1 = [make_targets(b1, v, 3)]
    expected = [
        one.train_step(b0, *t0, weights=[0.25, 0.75]),
        one.train_step(b1, *t1),
        one.train_step(GeneratedBatch("t", b2)),
    ]
    layout = [(2, [0.25, 0.75]), (1, None), (0, None)]
    got = many.train_steps(layout, b0, *t0, b1, *t1, GeneratedBatch("t", b2))
    assert [replace(r, busy_s=0.0) for r in got] == [replace(r, busy_s=0.0) for r in expected]
    assert all(r.busy_s > 0 for r in got) and many.step == one.step == 3
    a, b = weights(one), weights(many)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="the layout takes 2 arguments, got 3"):
        many.train_steps([(1, None)], b0, t0[0], b1)
    with pytest.raises(ValueError, match="not a batch and 1 targets"):
        many.train_steps([(1, None), (1, None)], b0, t0[0], b1, b2)
    assert many.step == 3 and all(torch.equal(a[k], v) for k, v in weights(many).items())
