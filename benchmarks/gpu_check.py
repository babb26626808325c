"""GPU check at real vocabulary: student step time, teacher tokens/s and payload per token.

Runs the actor classes in-process (no Ray): ``TeacherService`` computes compact top-k targets,
``StudentTrainer`` takes optimizer steps on them, both on one device (``--device``). The models
are randomly initialised with the shapes of Qwen2.5 checkpoints (benchmarks/memory_plan.py holds
their configs; no download): by default a 0.5B student and a 1.5B teacher, logits 151,936 wide
(``--teacher 7B`` gives a teacher padded to 152,064 rows, which must work too). Weights are
random, so the losses mean nothing; times, memory and bytes are real. Prints one markdown table.

    python benchmarks/gpu_check.py                      # on a GPU: < 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick # tiny widths, real vocabulary, on a CPU

Inputs are random token ids (rows of ``--length`` tokens, the last ``--scored`` share of each
row carrying loss), so no dataset and no tokenizer download is needed: with ``--tokenizer``
unset, a stand-in tokenizer with the Qwen3 tokenizer's 151,669 ids is written.
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_plan import CONFIGS  # the Qwen2.5 shapes, kept in one place

SHAPES = {"0.5B": "Qwen2.5-0.5B-Instruct", "1.5B": "Qwen2.5-1.5B-Instruct"}
SHAPES |= {"3B": "Qwen2.5-3B-Instruct", "7B": "Qwen2.5-7B-Instruct"}
TOKENS = 151_669  # ids the Qwen3 tokenizer defines; the models pad to 151,936 (7B: 152,064)
QUICK = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
GIB = 1024**3


def standin_tokenizer(out: Path) -> None:
    """A WordLevel tokenizer with TOKENS ids (id = token number), saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, TOKENS)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tok.save_pretrained(out)


def make_checkpoint(
    shape: str, quick: bool, out: Path, tokenizer_dir: Path, device: str, seed: int
) -> int:
    """A randomly initialised Qwen2 model of ``shape`` in bf16, saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    values = dict(CONFIGS[SHAPES[shape]])
    if quick:
        values |= QUICK
    config = Qwen2Config(**values, max_position_embeddings=4096)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return n


def make_batch(step: int, rows: int, length: int, scored: float, seed: int):
    from clpd_ray.messages import Batch

    rng = np.random.default_rng([seed, step])
    ids = rng.integers(2, TOKENS, size=(rows, length), dtype=np.int64)
    attn = np.ones((rows, length), dtype=np.int64)
    loss = np.zeros((rows, length), dtype=bool)
    loss[:, int(length * (1 - scored)) : length - 1] = True  # the last position predicts nothing
    return Batch(step, 0, ids, attn, loss, np.arange(rows, dtype=np.int64))


def _kwargs(fn, **candidates):
    """The candidates ``fn`` accepts (the actors' constructors grow options over time)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in candidates.items() if k in params}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated() / GIB
    torch.cuda.reset_peak_memory_stats()
    return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda | cuda:N | cpu")
    ap.add_argument("--quick", action="store_true", help="tiny widths and batch (real vocabulary)")
    ap.add_argument("--student", choices=sorted(SHAPES), default="0.5B")
    ap.add_argument("--teacher", choices=sorted(SHAPES), default="1.5B")
    ap.add_argument("--batch", type=int, help="rows per step (default 32; --quick 2)")
    ap.add_argument("--length", type=int, help="tokens per row (default 512; --quick 64)")
    ap.add_argument("--grad-accum", type=int, default=None, help="default batch/8 (--quick 1)")
    ap.add_argument("--scored", type=float, default=0.6, help="share of each row carrying loss")
    ap.add_argument("--steps", type=int, help="timed steps (default 10; --quick 2)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--target-dtype", default="float16")
    ap.add_argument("--precision", default="bf16", help="train.precision of the student")
    ap.add_argument("--checkpointing", action="store_true", help="student.gradient_checkpointing")
    ap.add_argument("--tokenizer", type=Path, help="a save_pretrained tokenizer (e.g. Qwen3)")
    args = ap.parse_args()
    quick = args.quick
    batch = args.batch or (2 if quick else 32)
    length = args.length or (64 if quick else 512)
    steps = args.steps or (2 if quick else 10)
    accum = args.grad_accum or (1 if quick else max(1, batch // 8))
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run with --device cpu --quick")
    os.environ["CLPD_DEVICE"] = device  # the actors' pick_device honours it
    if device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    from clpd_ray.config import load_config
    from clpd_ray.runtime.actors.student import StudentTrainer
    from clpd_ray.runtime.actors.teacher import TeacherService

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok_dir = args.tokenizer
        if tok_dir is None:
            tok_dir = tmp / "tokenizer"
            standin_tokenizer(tok_dir)
        init_dev = "cpu" if device == "cpu" else device
        n_student = make_checkpoint(args.student, quick, tmp / "student", tok_dir, init_dev, 0)
        n_teacher = make_checkpoint(args.teacher, quick, tmp / "teacher", tok_dir, init_dev, 1)
        overrides = [
            f"student.path={tmp / 'student'}",
            f"train.batch_size={batch}",
            f"train.grad_accum={accum}",
            f"train.precision={args.precision}",
            f"train.total_steps={steps + 2}",
            f"student.gradient_checkpointing={str(args.checkpointing).lower()}",
            "student.lr=1e-5",
            "student.warmup_steps=0",
            f"teachers.top_k={args.top_k}",
            f"teachers.target_dtype={args.target_dtype}",
            "teachers.dtype=bfloat16",
        ]
        config = load_config(None, overrides)
        setup_s = time.perf_counter() - t0

        teacher = TeacherService(
            "teacher",
            0,
            tmp / "teacher",
            **_kwargs(
                TeacherService.__init__,
                top_k=args.top_k,
                threads=None,
                dtype="bfloat16",
                micro_batch=config.teachers.micro_batch,
                target_dtype=args.target_dtype,
                loss_chunk=config.distill.loss_chunk,
                config=config,
            ),
        )
        batches = [make_batch(s, batch, length, args.scored, 0) for s in range(steps + 2)]
        _peak(device)
        targets = [teacher.targets(batches[0]), teacher.targets(batches[1])]  # warm-up
        _sync(device)
        start = time.perf_counter()
        for b in batches[2:]:
            targets.append(teacher.targets(b))
        _sync(device)
        teacher_s = time.perf_counter() - start
        teacher_peak = _peak(device)
        scored = sum(b.num_target_tokens for b in batches[2:])
        payload = sum(int(t.logprobs.nbytes + t.ids.nbytes) for t in targets[2:])
        del teacher
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        student = StudentTrainer(config, tmp / "student", threads=None)
        losses = [student.train_step(batches[0], targets[0]).loss]  # warm-up
        losses.append(student.train_step(batches[1], targets[1]).loss)
        _sync(device)
        start = time.perf_counter()
        for b, t in zip(batches[2:], targets[2:], strict=True):
            losses.append(student.train_step(b, t).loss)
        _sync(device)
        student_s = time.perf_counter() - start
        student_peak = _peak(device)

    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    peak = lambda x: "-" if x is None else f"{x:.2f} GiB"  # noqa: E731
    print(f"## gpu_check on {name} ({'quick, ' if quick else ''}{time.perf_counter() - t0:.0f} s)")
    print(
        f"student {args.student}-shaped ({n_student / 1e6:.1f} M params, precision "
        f"{args.precision}, checkpointing {args.checkpointing}), teacher {args.teacher}-shaped "
        f"({n_teacher / 1e6:.1f} M params, bf16); batch {batch} x {length} tokens, grad_accum "
        f"{accum}, {args.scored:.0%} of positions scored, k = {args.top_k} "
        f"({args.target_dtype}); {steps} timed steps after 2 warm-up; setup {setup_s:.0f} s"
    )
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| student step | {1000 * student_s / steps:.1f} ms |")
    print(f"| student scored tokens/s | {scored / student_s:,.0f} |")
    print(f"| student peak memory | {peak(student_peak)} |")
    print(f"| teacher targets per batch | {1000 * teacher_s / steps:.1f} ms |")
    print(f"| teacher tokens/s (all input tokens) | {steps * batch * length / teacher_s:,.0f} |")
    print(f"| teacher scored tokens/s | {scored / teacher_s:,.0f} |")
    print(f"| teacher peak memory | {peak(teacher_peak)} |")
    print(f"| payload per scored token | {payload / scored:,.0f} B |")
    print(
        f"| full-vocabulary fp32 per token | {4 * CONFIGS[SHAPES[args.teacher]]['vocab_size']:,} B |"
    )
    finite = all(np.isfinite(losses))
    print(f"| losses finite | {finite} (first {losses[0]:.3f}, last {losses[-1]:.3f}) |")
    if not finite:
        sys.exit(1)


if __name__ == "__main__":
    main()
