"""The student trainer: owns the student model, optimizer and LR schedule.

``train_step`` takes a batch and the current teacher's top-k targets (token-level KD), several
teachers' targets with weights (a soft teacher mixture), or a teacher-generated batch
(sequence-level KD, hard cross-entropy). Checkpoints hold everything a restart needs: model,
optimizer, LR schedule, step and RNG state; the actor writes them (and the final model) to the
run's storage itself, from its own node, so no node needs to see another's disk.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clpd_ray.config import Config
from clpd_ray.data.example import Example
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.losses import hard_ce_loss, sparse_kd_loss
from clpd_ray.distill.models import count_parameters, make_model
from clpd_ray.distill.state import load_state_strict
from clpd_ray.distill.training import evaluate_accuracy, make_optimizer
from clpd_ray.errors import DivergedError
from clpd_ray.messages import Batch, GeneratedBatch, StepResult, TeacherTargets
from clpd_ray.runtime import storage
from clpd_ray.runtime.actors.device import assigned_gpu_ids, pick_device, set_threads
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.models_store import fetch, fetch_spec
from clpd_ray.runtime.rundir import sha256, verify_files

__all__ = ["StudentTrainer", "diverged_message"]


class StudentTrainer:
    def __init__(
        self,
        config: Config,
        tokenizer_dir: str | Path,
        *,
        run_id: str = "local",
        threads: int | None = 1,
    ) -> None:
        set_threads(threads)
        self.config = config
        self.device = pick_device()
        self.tokenizer = load_tokenizer(fetch(tokenizer_dir))
        self.student_spec = fetch_spec(config.student)  # an s3:// student.path, on this node
        self.vocab_size = len(self.tokenizer)
        self.busy_s = 0.0
        self.metrics = RunMetrics(run_id)
        self.reset()

    def reset(self) -> int:
        """The state before step 0: seeded model, fresh optimizer and LR schedule, seeded RNG.

        ``__init__`` ends here, so a restarted actor and a reset one are the same.
        """
        config = self.config
        torch.manual_seed(config.seed)
        self.model = make_model(self.student_spec, self.tokenizer, seed=config.seed).to(self.device)  # type: ignore[arg-type]
        self.model.train()
        s = config.student
        self.opt, self.sched = make_optimizer(
            self.model, s.lr, config.train.total_steps, s.warmup_steps, s.weight_decay
        )
        self.step = 0
        return self.step

    def __repr__(self) -> str:
        # Safe on a half-built object (Ray calls repr when __init__ raised).
        return (
            f"StudentTrainer(step={getattr(self, 'step', '?')}, "
            f"device={getattr(self, 'device', '?')})"
        )

    def _loss(
        self,
        logits: torch.Tensor,
        batch: Batch,
        targets: Sequence[TeacherTargets],
        weights: Sequence[float],
    ) -> tuple[torch.Tensor, float, float]:
        """(total, kd part, ce part). No targets means sequence-level KD: hard CE only."""
        d = self.config.distill
        logits = logits[..., : self.vocab_size]  # (B, T, V): drop padded embedding rows
        mask = torch.as_tensor(batch.loss_mask, device=self.device)  # (B, T)
        labels = torch.roll(torch.as_tensor(batch.input_ids, device=self.device), -1, dims=1)
        if not targets:
            ce = hard_ce_loss(logits, labels, mask)
            return ce, 0.0, float(ce.detach())
        kd = logits.new_zeros((), dtype=torch.float32)
        for t, w in zip(targets, weights, strict=True):
            kd = kd + w * sparse_kd_loss(
                logits,
                torch.as_tensor(t.logprobs, device=self.device),  # (B, T, K)
                torch.as_tensor(t.ids, device=self.device),  # (B, T, K)
                mask,
                d.loss,
                tail=d.tail,
                beta=d.beta,
                alpha=d.alpha,
                temperature=t.temperature,
                scale_by_t2=d.scale_by_t2,
            )
        if d.ce_weight == 0:
            return kd, float(kd.detach()), 0.0
        ce = hard_ce_loss(logits, labels, mask)
        return kd + d.ce_weight * ce, float(kd.detach()), float(ce.detach())

    def train_step(
        self,
        batch: Batch | GeneratedBatch,
        *targets: TeacherTargets,
        weights: Sequence[float] | None = None,
    ) -> StepResult:
        """One optimizer step. Targets come from Ray already resolved (refs passed as arguments)."""
        start = time.perf_counter()
        if isinstance(batch, GeneratedBatch):
            batch = batch.batch
        if weights is None:
            weights = [1.0 / len(targets)] * len(targets) if targets else []
        ids = torch.as_tensor(batch.input_ids, device=self.device)
        attn = torch.as_tensor(batch.attention_mask, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=attn).logits  # (B, T, V)
        loss, kd, ce = self._loss(logits, batch, targets, weights)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            # Stop before the optimizer writes NaN into every weight.
            self.opt.zero_grad(set_to_none=True)
            raise DivergedError(diverged_message(self.config, batch.step, loss, kd, ce, grad_norm))
        self.opt.step()
        lr = float(self.sched.get_last_lr()[0])
        self.sched.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        tokens = batch.num_target_tokens
        self.metrics.student_step(float(loss.detach()), tokens / max(elapsed, 1e-9), lr)
        return StepResult(
            step=batch.step,
            loss=float(loss.detach()),
            kd_loss=kd,
            ce_loss=ce,
            lr=lr,
            tokens=tokens,
            busy_s=elapsed,
        )

    def evaluate(self, examples: Sequence[Example], max_new_tokens: int) -> dict:
        return evaluate_accuracy(
            self.model, self.tokenizer, examples, max_new_tokens=max_new_tokens
        )

    def weights(self) -> dict[str, np.ndarray]:
        """The student's parameters as numpy arrays (zero-copy through the object store)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    def save_pretrained(self, uri: str | Path) -> str:
        """Save model + tokenizer to ``uri`` (the run's ``student/``), from this node."""
        uri = str(uri)
        with _scratch("clpd-student-") as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            storage.delete_tree(uri)
            storage.upload_dir(tmp, uri)
        return uri

    def checkpoint(self, uri: str | Path) -> str:
        """Write model (safetensors), optimizer + LR schedule + RNG (torch, weights-only loadable)
        and ``student.json`` (step, and every other file's size and sha256) to ``uri``.

        ``uri`` is the run directory's ``checkpoint_dir(step)``: the files are written to a local
        temporary directory on this node and uploaded, ``student.json`` last; the driver then
        commits the checkpoint (controller.json and a manifest).
        """
        uri = str(uri)
        with _scratch("clpd-ckpt-") as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(_untie(state), str(tmp / "student.safetensors"))
            extra = {
                "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(),
                "torch_rng": torch.get_rng_state(),
            }
            if self.device.type == "cuda":
                extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            torch.save(extra, tmp / "student_optim.pt")
            files = {}
            for name in ("student.safetensors", "student_optim.pt"):
                data = (tmp / name).read_bytes()
                files[name] = {"size": len(data), "sha256": sha256(data)}
            meta = {"step": self.step, "busy_s": self.busy_s, "files": files}
            (tmp / "student.json").write_text(json.dumps(meta))
            storage.upload_dir(tmp, uri, last=("student.json",))
        return uri

    def restore(self, uri: str | Path | None) -> int:
        """Load a :meth:`checkpoint` (``None``: :meth:`reset` to step 0); returns the step.

        A checkpoint in S3 is downloaded to a local temporary directory first; every file is
        checked against the sizes and hashes in ``student.json`` before it is loaded.
        """
        if uri is None:
            return self.reset()
        uri = str(uri)
        with _scratch("clpd-restore-") as tmp:
            local = Path(uri) if not storage.is_s3(uri) else storage.download_dir(uri, tmp)
            meta = json.loads((local / "student.json").read_text())
            verify_files(local, meta["files"])
            weights = load_file(str(local / "student.safetensors"), device=str(self.device))
            load_state_strict(self.model, weights, what=f"checkpoint {uri}")
            self.model.tie_weights()
            # weights_only: a checkpoint file never runs code when loaded.
            extra = torch.load(
                local / "student_optim.pt", weights_only=True, map_location=self.device
            )
        self.opt.load_state_dict(extra["optimizer"])
        self.sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"].cpu())
        if "cuda_rng" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"].cpu(), self.device)
        self.step = int(meta["step"])
        return self.step

    def stats(self) -> dict:
        return {
            "step": self.step,
            "busy_s": self.busy_s,
            "parameters": count_parameters(self.model),
        }

    def gpu_ids(self) -> list[str]:
        return assigned_gpu_ids()

    def pid(self) -> int:
        return os.getpid()


@contextlib.contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    """A node-local temporary directory, removed afterwards."""
    tmp = storage.local_temp_dir(prefix)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): store each once."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.data_ptr()
        if ptr in seen:
            continue
        seen[ptr] = k
        out[k] = v
    return out


def diverged_message(
    config: Config, step: int, loss: torch.Tensor, kd: float, ce: float, grad_norm: torch.Tensor
) -> str:
    """Why step ``step`` was not applied, and the setting most likely to blame."""
    d, s = config.distill, config.student
    if d.temperature < 0.05:
        likely = f"distill.temperature={d.temperature:g} is so small that softmax(logits/T) overflows; use 0.5-4"
    elif not torch.isfinite(loss):
        likely = f"the {d.loss} loss overflowed; try distill.loss=fkl, or lower student.lr (now {s.lr:g})"
    else:
        likely = f"the gradients overflowed; lower student.lr (now {s.lr:g}) or raise student.warmup_steps"
    return (
        f"step {step}: the student's loss is {float(loss.detach()):g} (kd {kd:g}, ce {ce:g}) and "
        f"its gradient norm {float(grad_norm):g}: not finite, so the step was not applied and the "
        f"run stops with its last checkpoint intact; likely cause: {likely}"
    )
