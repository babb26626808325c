"""How much the top-k teacher targets cost and how far their KD loss is from full-vocabulary KD.

For each k and tail mode, on a teacher's and a student's real distributions over GSM8K text at the
loss positions (answer tokens + eos), prints:

- bytes per distilled token: k x (2 + 4) for float16 log-probs + int32 ids (what the teacher
  sends), k x (4 + 8) for float32 + int64 (the old format), against 4 V for fp32 full logits;
- relative error of the top-k loss: |L_k - L_full| / L_full, both the mean over the same positions;
- cosine between the gradients of L_k and L_full w.r.t. the student logits (all positions x V).

The targets go through float16 as in transport (``--target-dtype``), so their rounding is part
of the error. Logits are sliced to the tokenizer's size, as the teacher service does.

    # a config's pre-trained ladder: strongest rung vs weakest, on its held-out rows
    python benchmarks/topk_error.py --ladder configs/gsm8k_tiny.yaml
    # any two save_pretrained directories, on the packaged GSM8K test sample
    python benchmarks/topk_error.py --teacher DIR --student DIR
    # a quickly trained stand-in pair (development only: two tiny Qwen3 models on GSM8K text)
    python benchmarks/topk_error.py --standin /tmp/topk-standin
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

KS = (8, 16, 32, 64, 128, 256)
TAILS = ("renormalise", "zero", "tail_bucket")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "clpd_ray" / "data" / "samples" / "gsm8k" / "test.jsonl"
DEFAULT_TOKENIZER = REPO.parent / "shared" / "tokenizers" / "qwen3"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def read_examples(path: Path, rows: int) -> list:
    """The first ``rows`` GSM8K-style rows (question / answer fields) as Examples."""
    from clpd_ray.data.loaders import load_examples

    return load_examples(path, prompt_field="question", cot_field="answer")[:rows]


def encode(tokenizer, examples: list, max_length: int | None, fmt=None):
    """Prompt + target tokenized together; loss on target tokens and the end token (numpy)."""
    from clpd_ray.data.batching import encode_examples
    from clpd_ray.data.prompt_format import PromptFormat

    return encode_examples(tokenizer, examples, max_length, fmt or PromptFormat())


# ----------------------------------------------------------------------------------------------
# A stand-in ladder for development (before the real pre-trained teachers exist)


def train_standin(out: Path, tokenizer_dir: Path, data: Path, steps: int, seed: int = 0) -> None:
    """Two tiny Qwen3 models on GSM8K text, saved as ``out/teacher`` and ``out/student``."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from clpd_ray.data.tokenizer import load_tokenizer
    from clpd_ray.distill.training import lm_loss, make_optimizer, to_torch

    tok = load_tokenizer(tokenizer_dir)
    train = read_examples(data.parent / "train.jsonl", 4000)
    sizes = {"teacher": (96, 2, steps), "student": (32, 1, max(steps // 4, 1))}
    for name, (width, layers, n_steps) in sizes.items():
        if (out / name / "config.json").exists():
            continue
        cfg = Qwen3Config(
            vocab_size=151_936,
            hidden_size=width,
            intermediate_size=3 * width,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=width // 4,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
        model.train()
        opt, sched = make_optimizer(model, 3e-3, n_steps, warmup=n_steps // 10)
        rng = np.random.default_rng(seed)
        start = time.perf_counter()
        for step in range(n_steps):
            idx = rng.choice(len(train), 8, replace=False)
            enc = encode(tok, [train[i] for i in idx], 192)
            loss = lm_loss(model, to_torch(enc))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % 50 == 0 or step == n_steps - 1:
                el = time.perf_counter() - start
                print(f"  stand-in {name} step {step}: loss {float(loss):.3f} ({el:.0f} s)")
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)


# ----------------------------------------------------------------------------------------------
# The measurement


@torch.no_grad()
def position_logits(model, enc, vocab: int, batch: int = 4) -> torch.Tensor:
    """float32 logits at the loss positions, (N, vocab), in row-major mask order."""
    out = []
    for s in range(0, enc.input_ids.shape[0], batch):
        ids = torch.as_tensor(enc.input_ids[s : s + batch])
        attn = torch.as_tensor(enc.attention_mask[s : s + batch])
        mask = torch.as_tensor(enc.loss_mask[s : s + batch])
        logits = model(input_ids=ids, attention_mask=attn).logits  # (b, T, V_padded)
        out.append(logits[mask][:, :vocab].float())  # (n, vocab)
    return torch.cat(out)


def _loss_and_grad(fn, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    x = s.detach().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return float(loss.detach()), grad


def measure(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    kinds: list[str],
    ks: list[int],
    target_dtype: torch.dtype,
    chunk: int,
) -> dict[tuple[str, int, str], tuple[float, float]]:
    """{(kind, k, tail): (relative loss error, gradient cosine)} over all N positions, and
    {(kind, 0, "full"): (full-vocabulary loss per position, nan)}.

    Sums over chunks of positions: the loss and gradient of a chunk do not depend on the others,
    so sum(L), sum(g.g) and sum(g.g_full) add up exactly.
    """
    from clpd_ray.distill.losses import kd_loss_flat, sparse_kd_loss_flat, topk_targets

    n = teacher_logits.shape[0]
    sums: dict = {}
    for start in range(0, n, chunk):
        t = teacher_logits[start : start + chunk]  # (c, V)
        s = student_logits[start : start + chunk]  # (c, V)
        for kind in kinds:
            full, g_full = _loss_and_grad(
                lambda x, kind=kind, t=t: kd_loss_flat(x, t, kind, reduction="sum"), s
            )
            acc = sums.setdefault((kind, "full"), [0.0, 0.0])
            acc[0] += full
            acc[1] += float((g_full * g_full).sum())
            for k in ks:
                lp, ids = topk_targets(t, k)  # (c, k) float32, int64
                lp = lp.to(target_dtype).float()  # the transport's rounding
                for tail in TAILS:
                    val, g = _loss_and_grad(
                        lambda x, kind=kind, lp=lp, ids=ids, tail=tail: sparse_kd_loss_flat(
                            x, lp, ids, kind, tail=tail, reduction="sum"
                        ),
                        s,
                    )
                    acc = sums.setdefault((kind, k, tail), [0.0, 0.0, 0.0])
                    acc[0] += val
                    acc[1] += float((g * g).sum())
                    acc[2] += float((g * g_full).sum())
    out = {}
    for kind in kinds:
        full, full_sq = sums[(kind, "full")]
        for k in ks:
            for tail in TAILS:
                val, sq, dot = sums[(kind, k, tail)]
                rel = abs(val - full) / abs(full) if full else math.nan
                cos = dot / math.sqrt(sq * full_sq) if sq and full_sq else math.nan
                out[(kind, k, tail)] = (rel, cos)
        out[(kind, 0, "full")] = (full / n, math.nan)
    return out


def table(results: dict, kinds: list[str], ks: list[int], vocab_bytes: int) -> str:
    lines = [
        "| loss | k | B/token f16+i32 | B/token f32+i64 | "
        + " | ".join(f"{t} err / cos" for t in TAILS)
        + " |",
        "|---|---|---|---|" + "---|" * len(TAILS),
    ]
    for kind in kinds:
        for k in ks:
            cells = []
            for tail in TAILS:
                rel, cos = results[(kind, k, tail)]
                cells.append(f"{100 * rel:.2f}% / {cos:.4f}")
            lines.append(f"| {kind} | {k} | {6 * k:,} | {12 * k:,} | " + " | ".join(cells) + " |")
    lines.append(f"\nfull-vocabulary fp32 logits: {vocab_bytes:,} B/token")
    return "\n".join(lines)


def _ladder_pair(config_path: Path, rows: int):
    """(teacher dir, student dir, held-out examples, prompt format, max_length) of a config's
    ladder: its strongest rung as the teacher, its weakest as the student (trained if needed,
    exactly as ``clpd ladder`` does)."""
    from clpd_ray.config import load_config
    from clpd_ray.workload import build_workload

    workload = build_workload(load_config(config_path))
    ladder = workload.ladder
    if len(ladder) < 2:
        raise SystemExit(f"{config_path}: the ladder needs two rungs (teacher and student)")
    return (
        ladder[-1].path,
        ladder[0].path,
        workload.eval[:rows],
        workload.prompt_format,
        workload.max_length,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ladder", type=Path, help="a config: its strongest vs weakest rung")
    src.add_argument("--standin", type=Path, help="train (once) and use a stand-in pair here")
    p.add_argument("--teacher", type=Path, help="teacher save_pretrained directory")
    p.add_argument("--student", type=Path, help="student save_pretrained directory (weaker)")
    p.add_argument("--standin-steps", type=int, default=300)
    p.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="for --standin")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K jsonl, held-out rows")
    p.add_argument("--rows", type=int, default=16, help="held-out GSM8K rows measured")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--kinds", default="fkl,rkl,jsd", help="comma-separated losses")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--target-dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--chunk", type=int, default=128, help="positions per loss evaluation")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from clpd_ray.data.tokenizer import load_tokenizer

    fmt = None
    max_length: int | None = args.max_length
    examples = None
    if args.ladder is not None:
        args.teacher, args.student, examples, fmt, max_length = _ladder_pair(args.ladder, args.rows)
        source = f"held-out rows of {args.ladder}"
    elif args.standin is not None:
        train_standin(args.standin, args.tokenizer, args.data, args.standin_steps)
        args.teacher = args.teacher or args.standin / "teacher"
        args.student = args.student or args.standin / "student"
    if args.teacher is None or args.student is None:
        p.error("give --ladder CONFIG, --standin DIR, or --teacher and --student directories")
    if examples is None:
        examples = read_examples(args.data, args.rows)
        source = f"{args.data.name}"

    tok = load_tokenizer(args.teacher)
    vocab = len(tok)  # the teacher service slices padded rows off the same way
    enc = encode(tok, examples, max_length, fmt)
    logits, widths = {}, {}
    for role, path in (("teacher", args.teacher), ("student", args.student)):
        m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        widths[role] = m.get_output_embeddings().weight.shape[0]
        logits[role] = position_logits(m, enc, vocab)
        print(f"{role}: {path} ({sum(q.numel() for q in m.parameters()):,} parameters)")
        del m
    t, s = logits["teacher"], logits["student"]
    kinds = args.kinds.split(",")
    ks = [int(k) for k in args.ks.split(",")]
    start = time.perf_counter()
    results = measure(t, s, kinds, ks, DTYPES[args.target_dtype], args.chunk)
    top = F.softmax(t, -1).topk(max(ks), -1).values.cumsum(-1)  # (N, max k)
    mass = ", ".join(f"k={k}: {float(top[:, k - 1].mean()):.3f}" for k in ks)
    print(
        f"{t.shape[0]} loss positions from {len(examples)} GSM8K rows ({source}); logits "
        f"{widths['teacher']:,} wide, sliced to the tokenizer's {vocab:,}; targets "
        f"{args.target_dtype}; measured in {time.perf_counter() - start:.0f} s"
    )
    print(f"teacher's top-k probability mass (mean over positions): {mass}")
    for kind in kinds:
        print(f"full-vocabulary {kind} (mean per position): {results[(kind, 0, 'full')][0]:.4f}")
    print()
    print(table(results, kinds, ks, 4 * widths["teacher"]))
    if args.json:
        rows = [
            {"kind": kd, "k": k, "tail": tl, "rel_error": v[0], "grad_cosine": v[1]}
            for (kd, k, tl), v in results.items()
        ]
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
