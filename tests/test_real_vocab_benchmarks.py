"""The real-vocabulary measurement scripts: memory plan, top-k error, GPU check (CPU form)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import memory_plan  # noqa: E402
import topk_error  # noqa: E402


@pytest.mark.parametrize("name", sorted(memory_plan.CONFIGS))
def test_parameter_count_matches_transformers(name: str) -> None:
    # Independent reference: the transformers model built from the same config values, on the
    # meta device (no memory), counted parameter by parameter.
    cfg = memory_plan.CONFIGS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(Qwen2Config(**cfg))
    expected = sum(p.numel() for p in model.parameters())  # tied weights counted once
    assert memory_plan.parameters(memory_plan.Shape.of(cfg)) == expected


def test_published_sizes_and_vocab() -> None:
    sizes = {
        n: memory_plan.parameters(memory_plan.Shape.of(c)) for n, c in memory_plan.CONFIGS.items()
    }
    # The model cards: 0.49B, 1.54B, 3.09B, 7.61B.
    assert round(sizes["Qwen2.5-0.5B-Instruct"] / 1e9, 2) == 0.49
    assert round(sizes["Qwen2.5-1.5B-Instruct"] / 1e9, 2) == 1.54
    assert round(sizes["Qwen2.5-3B-Instruct"] / 1e9, 2) == 3.09
    assert 7.61e9 <= sizes["Qwen2.5-7B-Instruct"] <= 7.62e9
    assert memory_plan.CONFIGS["Qwen2.5-7B-Instruct"]["vocab_size"] == 152_064


def test_plan_grows_with_batch_and_checkpointing_saves() -> None:
    cfg = memory_plan.CONFIGS["Qwen2.5-0.5B-Instruct"]
    small = memory_plan.plan("x", cfg, 1, 512, 1024)
    big = memory_plan.plan("x", cfg, 8, 512, 1024)
    assert big.student_act > small.student_act > big.student_act_ckpt / 8
    assert big.student_total_ckpt < big.student_total
    # 18 bytes of state per parameter (fp32 master + bf16 copy, fp32 grads, two Adam moments).
    state = big.student_weights + big.student_grads + big.student_adam
    assert state * memory_plan.GIB == pytest.approx(18 * big.params)
    fits = memory_plan.largest_micro_batch("x", cfg, 512, 1024, 0.9 * 24)
    assert fits["student_total_ckpt"] >= fits["student_total"] >= 1


def test_topk_error_is_zero_at_full_vocabulary() -> None:
    torch.manual_seed(0)
    v = 50
    teacher = torch.randn(20, v) * 3
    student = torch.randn(20, v)
    res = topk_error.measure(teacher, student, ["fkl", "rkl"], [v, 5], torch.float32, chunk=7)
    for kind in ("fkl", "rkl"):
        for tail in ("renormalise", "tail_bucket"):  # exact at k = V
            rel, cos = res[(kind, v, tail)]
            assert rel < 1e-4 and cos > 1 - 1e-5
        rel5, cos5 = res[(kind, 5, "renormalise")]
        assert rel5 > 1e-3 and cos5 < 0.9999  # truncation shows when k << V


def test_topk_error_chunking_does_not_change_result() -> None:
    torch.manual_seed(1)
    teacher, student = torch.randn(9, 30) * 2, torch.randn(9, 30)
    a = topk_error.measure(teacher, student, ["fkl"], [4], torch.float16, chunk=2)
    b = topk_error.measure(teacher, student, ["fkl"], [4], torch.float16, chunk=100)
    for key in a:
        torch.testing.assert_close(torch.tensor(a[key]), torch.tensor(b[key]), equal_nan=True)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_quick(monkeypatch, capsys) -> None:
    """The GPU machine's script, in its CPU form (in this process: it sets the device variable
    and the thread count, both put back after)."""
    import gpu_check

    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--device", "cpu", "--quick"])
    monkeypatch.setenv("CLPD_DEVICE", "cpu")  # main() sets it: monkeypatch restores it
    threads = torch.get_num_threads()
    try:
        gpu_check.main()  # exits 1 when a loss is not finite
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "| payload per scored token | 384 B |" in out  # k=64, float16 + int32
    assert "| losses finite | True" in out
