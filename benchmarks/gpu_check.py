"""GPU check of the actor classes, in-process (no Ray): the CUDA code paths and their speed.

Builds a tiny teacher and student for the embedded task, then runs the same distillation steps
on the CPU and on the GPU (``CLPD_DEVICE``) through ``TeacherService`` and ``StudentTrainer``:
top-k targets on the device, numpy hand-off, sparse KD loss and optimizer step on the device.
Prints the largest loss difference between the two runs and the time per step of each.

    python benchmarks/gpu_check.py --steps 50
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def run(device: str, steps: int, tmp: Path) -> tuple[list[float], float, str]:
    os.environ["CLPD_DEVICE"] = device
    from clpd_ray.config import load_config
    from clpd_ray.data.batching import encode_examples
    from clpd_ray.data.task import generate_examples
    from clpd_ray.messages import Batch
    from clpd_ray.runtime.actors.student import StudentTrainer
    from clpd_ray.runtime.actors.teacher import TeacherService

    config = load_config(None, ["train.total_steps=" + str(steps), "train.batch_size=64"])
    examples = generate_examples(64 * steps, 6, 0, "train")
    teacher = TeacherService("t", 0, tmp / "teacher", top_k=16)
    student = StudentTrainer(config, tmp / "teacher")
    losses = []
    for s in range(steps + 5):
        enc = encode_examples(teacher.tokenizer, examples[s * 64 % len(examples) :][:64])
        batch = Batch(s, 0, enc.input_ids, enc.attention_mask, enc.loss_mask, np.arange(64))
        if s == 5:  # warm-up done (CUDA context, kernels)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
        losses.append(student.train_step(batch, teacher.targets(batch)).loss)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / steps
    acc = student.evaluate(examples[:200], max_new_tokens=40)["accuracy"]
    return losses, per_step, f"{student.device} / {teacher.device}, eval ok ({acc:.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    from clpd_ray.config import TeacherSpec
    from clpd_ray.data.tokenizer import build_char_tokenizer
    from clpd_ray.distill.models import build_model

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        tok = build_char_tokenizer()
        build_model(TeacherSpec(name="t", n_layer=2, n_embd=64, n_head=4), tok).save_pretrained(
            tmp / "teacher"
        )
        tok.save_pretrained(tmp / "teacher")
        cpu, cpu_t, cpu_dev = run("cpu", args.steps, tmp)
        print(f"cpu:  {cpu_t * 1000:.1f} ms/step  ({cpu_dev})", flush=True)
        if not torch.cuda.is_available():
            print("no CUDA device: GPU half skipped")
            return
        gpu, gpu_t, gpu_dev = run("cuda", args.steps, tmp)
        print(f"cuda: {gpu_t * 1000:.1f} ms/step  ({gpu_dev}, {torch.cuda.get_device_name()})")
        diff = np.abs(np.array(cpu) - np.array(gpu))
        print(
            f"loss cpu vs cuda over {len(cpu)} steps: max |diff| {diff.max():.2e}, first {cpu[0]:.4f} vs {gpu[0]:.4f}, "
            f"last {cpu[-1]:.4f} vs {gpu[-1]:.4f}"
        )


if __name__ == "__main__":
    main()
