"""Peak memory per actor at real vocabulary: one teacher request and one student step, measured.

A tiny Qwen3-architecture model (2 layers, 64 wide) on the real Qwen3 tokenizer (151,669 tokens,
embeddings padded to 151,936 rows, as Qwen checkpoints pad them), so nearly all the memory is the
vocabulary's. Each measurement runs ``TeacherService`` or ``StudentTrainer`` in-process (no Ray) in
a fresh subprocess and reports its peak RSS (``ru_maxrss``; on a GPU also the CUDA peak):

    python benchmarks/memory.py                       # batch 32 x 512, k = 64, the defaults
    python benchmarks/memory.py --batch 8 --length 256 --set distill.loss_chunk=512

"new" is the code as it is, with the config's settings (teachers.micro_batch, target_dtype,
distill.loss_chunk, train.grad_accum, ...). "old" is the code path before compact targets and
chunking, written out here: full (B, T, V) logits over every position, a float32 log-softmax,
float32 + int64 top-k at every position, the masked loss over full student logits. Its memory is
linear in the rows, so it is measured at ``--old-rows`` (small) rows, and its extrapolation to the
batch is printed next to it, marked as such (measuring it at 32 x 512 takes ~30 GiB).

Rows are random token ids (memory does not depend on the text); the first ``--prompt`` positions
of each row are prompt (no loss), the rest are scored, as in a chain-of-thought batch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = ROOT.parent / "shared" / "tokenizers" / "qwen3"
PADDED_VOCAB = 151_936
MiB = 1 << 20


def _rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _device_peak() -> int | None:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None


def build_model_dir(tokenizer_dir: Path, out: Path, layers: int, width: int, heads: int) -> None:
    """Save a tiny Qwen3 model + the tokenizer to ``out`` (shared by every subprocess)."""
    from clpd_ray.config import ModelSpec
    from clpd_ray.data.tokenizer import load_tokenizer
    from clpd_ray.distill.models import build_model

    tok = load_tokenizer(tokenizer_dir)
    spec = ModelSpec(arch="qwen3", n_layer=layers, n_embd=width, n_head=heads, max_positions=4096)
    spec = spec.model_copy(update={"vocab_size": PADDED_VOCAB})
    build_model(spec, tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)


def make_batch(rows: int, length: int, prompt: int, vocab: int, seed: int = 0):
    from clpd_ray.messages import Batch

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=(rows, length))
    attn = np.ones((rows, length), dtype=np.int64)
    mask = np.zeros((rows, length), dtype=bool)
    mask[:, prompt - 1 : length - 1] = True  # positions predicting the target tokens
    return Batch(0, 0, ids, attn, mask, np.arange(rows))


def _config(args: argparse.Namespace, model_dir: Path, rows: int):
    from clpd_ray.config import load_config

    return load_config(
        None,
        [
            f"student.path={model_dir}",
            f"teachers.top_k={args.k}",
            f"train.batch_size={rows}",
            "train.total_steps=10",
            "student.warmup_steps=0",
            *args.set,
        ],
    )


# ----------------------------------------------------------------------------------------------
# Workers (one per subprocess)


def random_targets(batch, vocab: int, k: int, compact: bool, target_dtype: str):
    """Top-k targets of a random teacher (no teacher forward in the student's process)."""
    from clpd_ray.distill.compact import encode_logprobs
    from clpd_ray.messages import TeacherTargets

    rng = np.random.default_rng(1)
    shape = (batch.num_target_tokens, k) if compact else (*batch.input_ids.shape, k)
    lp = torch.log_softmax(torch.tensor(rng.standard_normal(shape), dtype=torch.float32), -1)
    start = rng.integers(0, vocab, size=(*shape[:-1], 1))
    ids = (start + 7919 * np.arange(k)) % vocab  # k distinct ids per position
    ids = ids.astype(np.int32 if compact else np.int64)
    return TeacherTargets("t", 0, encode_logprobs(lp, target_dtype), ids, 1.0)


def worker_new(role: str, args: argparse.Namespace, model_dir: Path) -> dict:
    from clpd_ray.runtime.actors.student import StudentTrainer
    from clpd_ray.runtime.actors.teacher import TeacherService

    config = _config(args, model_dir, args.batch)
    t = config.teachers
    if role == "teacher":
        teacher = TeacherService(
            "t", 0, model_dir, top_k=t.top_k, dtype=t.dtype, micro_batch=t.micro_batch,
            target_dtype=t.target_dtype,
        )  # fmt: skip
        vocab = teacher.vocab_size
    else:
        student = StudentTrainer(config, model_dir)
        vocab = student.vocab_size
    batch = make_batch(args.batch, args.length, args.prompt, vocab)
    if role == "student":
        targets = random_targets(batch, vocab, args.k, True, t.target_dtype)
    base, start = _rss_now(), time.perf_counter()
    if role == "teacher":
        targets = teacher.targets(batch)
    else:
        student.train_step(batch, targets)
    return {
        "baseline": base,
        "peak": _rss_peak(),
        "device_peak": _device_peak(),
        "seconds": time.perf_counter() - start,
        "payload": targets.nbytes,
        "tokens": batch.num_target_tokens,
    }


def worker_old(role: str, args: argparse.Namespace, model_dir: Path) -> dict:
    """The pre-chunking code path, written out: full logits everywhere, float32/int64 targets."""
    import torch.nn.functional as F

    from clpd_ray.data.tokenizer import load_tokenizer
    from clpd_ray.distill.losses import sparse_kd_loss
    from clpd_ray.distill.models import load_causal_lm
    from clpd_ray.distill.training import make_optimizer

    vocab = len(load_tokenizer(model_dir))
    model = load_causal_lm(model_dir)
    batch = make_batch(args.old_rows, args.length, args.prompt, vocab)
    ids = torch.as_tensor(batch.input_ids)
    attn = torch.as_tensor(batch.attention_mask)
    if role == "student":
        targets = random_targets(batch, vocab, args.k, False, "float32")  # (B, T, K) everywhere
        model.train()
        opt, _ = make_optimizer(model, 1e-3, 10, 0)
    base, start = _rss_now(), time.perf_counter()
    if role == "teacher":
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=attn).logits[..., :vocab]  # (B, T, V)
            logprobs = F.log_softmax(logits.float(), dim=-1)  # (B, T, V) float32
            values, top = logprobs.topk(args.k, dim=-1)
            payload = values.float().numpy().nbytes + top.long().numpy().nbytes
    else:
        logits = model(input_ids=ids, attention_mask=attn).logits[..., :vocab]
        loss = sparse_kd_loss(logits, targets.logprobs, targets.ids, batch.loss_mask, "fkl")
        opt.zero_grad()
        loss.backward()
        opt.step()
        payload = targets.nbytes
    return {
        "baseline": base,
        "peak": _rss_peak(),
        "device_peak": _device_peak(),
        "seconds": time.perf_counter() - start,
        "payload": int(payload),
        "tokens": batch.num_target_tokens,
    }


# ----------------------------------------------------------------------------------------------
# Driver


def _run_worker(which: str, role: str, argv: list[str], model_dir: Path) -> dict:
    cmd = [sys.executable, __file__, *argv, "--worker", f"{which}:{role}", "--model-dir"]
    out = subprocess.run([*cmd, str(model_dir)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{which} {role} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f} MiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--prompt", type=int, default=128, help="prompt positions per row (no loss)")
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--old-rows", type=int, default=2, help="rows the old path is measured at")
    p.add_argument("--no-old", action="store_true", help="skip the old code path")
    p.add_argument("--roles", default="teacher,student", help="which actors to measure")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="config override, key=value")
    p.add_argument("--tokenizer", type=Path, default=SHARED_TOKENIZER)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    if args.worker:
        which, role = args.worker.split(":")
        fn = worker_new if which == "new" else worker_old
        print(json.dumps(fn(role, args, args.model_dir)))
        return

    if not (args.tokenizer / "tokenizer.json").is_file():
        raise SystemExit(
            f"no tokenizer at {args.tokenizer}: pass --tokenizer DIR (a Qwen tokenizer directory)"
        )
    argv = sys.argv[1:]
    with tempfile.TemporaryDirectory() as d:
        model_dir = Path(d) / "tiny-qwen3"
        build_model_dir(args.tokenizer, model_dir, args.layers, args.width, args.heads)
        roles = args.roles.split(",")
        rows = [("new", role, args.batch) for role in roles]
        if not args.no_old:
            rows += [("old", role, args.old_rows) for role in roles]
        print(
            f"tiny Qwen3 ({args.layers} x {args.width}) at V={PADDED_VOCAB:,} "
            f"(tokenizer {args.tokenizer.name}), "
            f"length {args.length}, prompt {args.prompt}, k={args.k}, "
            f"device {'cuda' if torch.cuda.is_available() else 'cpu'}; overrides: {args.set or '-'}"
        )
        header = (
            f"{'path':4} {'actor':8} {'rows':>4} {'tokens':>7} {'baseline':>10} {'peak RSS':>10} "
            f"{'step adds':>10} {'GPU peak':>9} {'payload/token':>14} {'seconds':>8}"
        )
        print(header)
        for which, role, n in rows:
            r = _run_worker(which, role, argv, model_dir)
            per_token = r["payload"] / max(r["tokens"], 1)
            print(
                f"{which:4} {role:8} {n:>4} {r['tokens']:>7} {_fmt(r['baseline']):>10} "
                f"{_fmt(r['peak']):>10} {_fmt(r['peak'] - r['baseline']):>10} "
                f"{_fmt(r['device_peak']):>9} {per_token:>12,.0f} B {r['seconds']:>8.2f}",
                flush=True,
            )
            if which == "old":
                scale = args.batch / n  # the old path's transient is linear in the rows
                added = (r["peak"] - r["baseline"]) * scale
                print(
                    f"{'':4} {'':8} {args.batch:>4} {'':>7} {'':>10} "
                    f"{_fmt(r['baseline'] + added):>10} {_fmt(added):>10}   "
                    f"(extrapolated x{scale:g} from {n} rows, not measured)"
                )


if __name__ == "__main__":
    main()
