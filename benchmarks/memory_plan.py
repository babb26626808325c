"""Memory per actor for Qwen2.5 teachers and students, computed from the models' configs.

No weights are needed: the configs' public values are embedded below (source: each model's
``config.json`` on the Hugging Face hub, https://huggingface.co/Qwen/<name>/blob/main/config.json).
For each model it prints, in GiB, what one actor holds at a micro-batch of ``--micro-batch`` rows
of ``--length`` tokens, and the largest micro-batch that fits on 24, 80 and 141 GB GPUs:

- teacher, bf16 inference: weights + one layer's activations + the logits of one chunk of
  2**25 logits (the teacher projects and takes the top-k chunk by chunk);
- student, bf16 autocast with fp32 master weights and AdamW: weights, gradients and Adam moments
  in fp32, the bf16 weight copies autocast caches, activations (with and without gradient
  checkpointing) and the chunked KD loss over ``--loss-chunk`` positions.

    python benchmarks/memory_plan.py                       # micro-batch 8 x 512 tokens
    python benchmarks/memory_plan.py --micro-batch 4 --length 1024 --json plan.json

The formulas are in docs/gpu.md. They are estimates (allocator slack, fused kernels and library
versions move real figures by 10-20%); benchmarks/memory.py measures the real thing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

GIB = 1024**3

# config.json values of the public checkpoints (huggingface.co/Qwen/<name>/blob/main/config.json).
# The 7B pads its embedding to 152,064 rows and unties the output head; the others pad to 151,936
# and tie it. All use the same 151,665-token tokenizer map (151,669 with the Qwen3 tokenizer).
CONFIGS: dict[str, dict[str, int | bool]] = {
    "Qwen2.5-0.5B-Instruct": {
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
        "tie_word_embeddings": True,
    },
    "Qwen2.5-1.5B-Instruct": {
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
        "tie_word_embeddings": True,
    },
    "Qwen2.5-3B-Instruct": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151_936,
        "tie_word_embeddings": True,
    },
    "Qwen2.5-7B-Instruct": {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152_064,
        "tie_word_embeddings": False,
    },
}

# A teacher projects and takes the top-k of at most this many logits at a time
# (runtime/actors/teacher.py, _PROJECTION_ELEMENTS): 221 positions at V = 151,936.
TEACHER_CHUNK_LOGITS = 1 << 25
GPUS_GB = (24, 80, 141)
_MAX_ROWS = 512  # the search for the largest micro-batch stops here
# Of a GPU's memory, this share is usable by tensors: the CUDA context (~0.5-1 GiB), cuBLAS/NCCL
# workspaces and the caching allocator's fragmentation take the rest.
USABLE = 0.90


@dataclass(frozen=True)
class Shape:
    h: int  # hidden size
    inter: int  # MLP intermediate size
    layers: int
    heads: int
    kv_heads: int
    vocab: int  # padded embedding rows (the logit width)
    tied: bool

    @classmethod
    def of(cls, cfg: dict[str, int | bool]) -> Shape:
        return cls(
            h=int(cfg["hidden_size"]),
            inter=int(cfg["intermediate_size"]),
            layers=int(cfg["num_hidden_layers"]),
            heads=int(cfg["num_attention_heads"]),
            kv_heads=int(cfg["num_key_value_heads"]),
            vocab=int(cfg["vocab_size"]),
            tied=bool(cfg["tie_word_embeddings"]),
        )

    @property
    def head_dim(self) -> int:
        return self.h // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def parameters(s: Shape) -> int:
    """Parameter count: embeddings, per-layer attention (q/k/v with bias, o) + SwiGLU MLP + 2
    RMSNorms, the final norm, and the output head unless tied."""
    attn = s.h * s.h + s.h + 2 * (s.h * s.kv_dim + s.kv_dim) + s.h * s.h
    mlp = 3 * s.h * s.inter
    layer = attn + mlp + 2 * s.h
    head = 0 if s.tied else s.vocab * s.h
    return s.vocab * s.h + s.layers * layer + s.h + head


def layer_activation_bytes(s: Shape) -> int:
    """Bytes per token one decoder layer keeps for backward (bf16 autocast, SDPA attention).

    The residual stream stays fp32 under autocast (embeddings are not autocast), so each RMSNorm
    keeps a fp32 input (4h) and its bf16 output (2h). Attention keeps q, k, v after RoPE, its
    output and the o_proj input (bf16); flash/efficient SDPA keeps no T x T matrix. The SwiGLU MLP
    keeps gate and up outputs, silu(gate) and their product (4 x 2 I).
    """
    norms = 2 * (4 * s.h + 2 * s.h)
    attn = 2 * (s.h + 2 * s.kv_dim) + 2 * s.h + 2 * s.h  # q, k, v; output; o_proj input
    mlp = 4 * 2 * s.inter
    return norms + attn + mlp


@dataclass(frozen=True)
class Plan:
    model: str
    params: int
    teacher_weights: float
    teacher_activations: float
    teacher_logits: float
    teacher_total: float
    student_weights: float  # fp32 master + bf16 autocast copies
    student_grads: float
    student_adam: float
    student_act: float  # no checkpointing
    student_act_ckpt: float  # gradient checkpointing
    student_loss: float  # chunked KD loss
    student_total: float
    student_total_ckpt: float


def plan(name: str, cfg: dict, micro_batch: int, length: int, loss_chunk: int) -> Plan:
    """The figures of one model at ``micro_batch`` rows of ``length`` tokens, all of them scored
    (the worst case: in practice only the answer tokens are, and the hidden states and targets
    shrink with them)."""
    s = Shape.of(cfg)
    p = parameters(s)
    tokens = micro_batch * length
    chunk = min(loss_chunk, tokens)
    # Teacher: bf16 weights; activations of one layer at a time (inference keeps nothing), about
    # the MLP's three I-wide bf16 tensors + a few h-wide ones; the final hidden states of the
    # scored positions (bf16), and the logits of one chunk of them: bf16 from the head plus the
    # float32 copy topk_targets divides by T and takes the top-k of (2 + 4 B per logit).
    t_chunk = min(max(1, TEACHER_CHUNK_LOGITS // s.vocab), tokens)
    t_w = 2 * p
    t_act = tokens * (3 * 2 * s.inter + 4 * 4 * s.h)
    t_logits = tokens * 2 * s.h + t_chunk * s.vocab * (2 + 4)
    # Student: fp32 master weights (4 B) + the bf16 copies autocast caches during a step (2 B),
    # fp32 gradients (4 B), AdamW exp_avg + exp_avg_sq (8 B): 18 B per parameter.
    s_w, s_g, s_adam = 6 * p, 4 * p, 8 * p
    s_act = tokens * (s.layers * layer_activation_bytes(s) + 4 * s.h)  # + final norm input
    # Checkpointing keeps only each layer's fp32 input, and recomputes one layer in backward.
    s_act_ckpt = tokens * (s.layers * 4 * s.h + layer_activation_bytes(s) + 4 * s.h)
    # Chunked KD loss: per chunk of positions, bf16 logits, their fp32 upcast, the fp32
    # log-softmax and the two fp32 gradients (2 + 4 + 4 + 4 + 4 B per logit); plus the final
    # hidden states of all positions (fp32) that the chunks read.
    s_loss = chunk * s.vocab * 18 + tokens * 4 * s.h
    common = s_w + s_g + s_adam + s_loss
    return Plan(
        model=name,
        params=p,
        teacher_weights=t_w / GIB,
        teacher_activations=t_act / GIB,
        teacher_logits=t_logits / GIB,
        teacher_total=(t_w + t_act + t_logits) / GIB,
        student_weights=s_w / GIB,
        student_grads=s_g / GIB,
        student_adam=s_adam / GIB,
        student_act=s_act / GIB,
        student_act_ckpt=s_act_ckpt / GIB,
        student_loss=s_loss / GIB,
        student_total=(common + s_act) / GIB,
        student_total_ckpt=(common + s_act_ckpt) / GIB,
    )


def largest_micro_batch(name: str, cfg: dict, length: int, loss_chunk: int, gib: float) -> dict:
    """Largest micro-batch (rows of ``length``) per role that fits in ``gib`` usable GiB (0: none)."""
    out = {}
    for role in ("teacher_total", "student_total", "student_total_ckpt"):
        best = 0
        for b in range(1, _MAX_ROWS + 1):
            if getattr(plan(name, cfg, b, length, loss_chunk), role) > gib:
                break
            best = b
        out[role] = best
    return out


def _fmt_rows(b: int) -> str:
    return f"{b}+" if b >= _MAX_ROWS else str(b)


def _fmt(x: float) -> str:
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward")
    ap.add_argument("--length", type=int, default=512, help="tokens per row")
    ap.add_argument("--loss-chunk", type=int, default=1024, help="distill.loss_chunk")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    b, t, c = args.micro_batch, args.length, args.loss_chunk
    plans = [plan(n, cfg, b, t, c) for n, cfg in CONFIGS.items()]

    print(f"### Memory per actor, GiB (micro-batch {b} x {t} tokens, loss chunk {c} positions)\n")
    print(
        "| model | params | teacher: weights | act. | logits | **total** | student: weights "
        "| grads | AdamW | act. | act. (ckpt) | loss chunk | **total** | **total (ckpt)** |"
    )
    print("|---|---|" + "---|" * 12)
    for q in plans:
        print(
            f"| {q.model} | {q.params / 1e9:.2f} B | {_fmt(q.teacher_weights)} | "
            f"{_fmt(q.teacher_activations)} | {_fmt(q.teacher_logits)} | "
            f"**{_fmt(q.teacher_total)}** | {_fmt(q.student_weights)} | {_fmt(q.student_grads)} | "
            f"{_fmt(q.student_adam)} | {_fmt(q.student_act)} | {_fmt(q.student_act_ckpt)} | "
            f"{_fmt(q.student_loss)} | **{_fmt(q.student_total)}** | "
            f"**{_fmt(q.student_total_ckpt)}** |"
        )

    print(
        f"\n### Largest micro-batch of {t} tokens that fits ({int(USABLE * 100)}% of the GPU "
        "usable; 0 = does not fit)\n"
    )
    header = " | ".join(f"{g} GB" for g in GPUS_GB)
    print(f"| model | role | {header} |")
    print("|---|---|" + "---|" * len(GPUS_GB))
    fits: dict = {}
    roles = {
        "teacher_total": "teacher (bf16 inference)",
        "student_total": "student (bf16 autocast + fp32 AdamW)",
        "student_total_ckpt": "student + gradient checkpointing",
    }
    for name, cfg in CONFIGS.items():
        per_gpu = {g: largest_micro_batch(name, cfg, t, c, USABLE * g) for g in GPUS_GB}
        fits[name] = per_gpu
        for role, label in roles.items():
            cells = " | ".join(_fmt_rows(per_gpu[g][role]) for g in GPUS_GB)
            print(f"| {name} | {label} | {cells} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "micro_batch": b,
                    "length": t,
                    "loss_chunk": c,
                    "plans": [asdict(q) for q in plans],
                    "largest_micro_batch": fits,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
