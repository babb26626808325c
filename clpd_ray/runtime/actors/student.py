"""The student trainer: owns the student model, optimizer and LR schedule.

``train_step`` takes a batch and the current teacher's top-k targets (token-level KD), several
teachers' targets with weights (a soft teacher mixture), or a teacher-generated batch
(sequence-level KD, hard cross-entropy). Checkpoints hold everything a restart needs: model,
optimizer, LR schedule, step and RNG state, written atomically.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from clpd_ray.config import Config
from clpd_ray.data.example import Example
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.losses import hard_ce_loss, sparse_kd_loss
from clpd_ray.distill.models import count_parameters, make_model
from clpd_ray.distill.training import evaluate_accuracy, make_optimizer
from clpd_ray.messages import Batch, GeneratedBatch, StepResult, TeacherTargets
from clpd_ray.runtime.actors.device import assigned_gpu_ids, pick_device, set_threads
from clpd_ray.runtime.metrics import RunMetrics

__all__ = ["StudentTrainer"]


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
        self.tokenizer = load_tokenizer(tokenizer_dir)
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
        self.model = make_model(config.student, self.tokenizer, seed=config.seed).to(self.device)  # type: ignore[arg-type]
        self.model.train()
        s = config.student
        self.opt, self.sched = make_optimizer(
            self.model, s.lr, config.train.total_steps, s.warmup_steps, s.weight_decay
        )
        self.step = 0
        return self.step

    def __repr__(self) -> str:
        return f"StudentTrainer(step={self.step}, device={self.device})"

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
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
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

    def save_pretrained(self, path: str | Path) -> str:
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return str(path)

    def checkpoint(self, path: str | Path) -> str:
        """Write model (safetensors), optimizer + LR schedule + RNG (torch, weights-only loadable).

        ``path`` is the run directory's temporary checkpoint directory; the controller renames it
        into place once every file is written.
        """
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        save_file(_untie(state), str(path / "student.safetensors"))
        extra = {
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "torch_rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":
            extra["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        torch.save(extra, path / "student_optim.pt")
        (path / "student.json").write_text(json.dumps({"step": self.step, "busy_s": self.busy_s}))
        return str(path)

    def restore(self, path: str | Path | None) -> int:
        """Load a :meth:`checkpoint` (``None``: :meth:`reset` to step 0); returns the step."""
        if path is None:
            return self.reset()
        path = Path(path)
        weights = load_file(str(path / "student.safetensors"), device=str(self.device))
        self.model.load_state_dict(weights, strict=False)
        self.model.tie_weights()
        # weights_only: a checkpoint file never runs code when loaded.
        extra = torch.load(path / "student_optim.pt", weights_only=True, map_location=self.device)
        self.opt.load_state_dict(extra["optimizer"])
        self.sched.load_state_dict(extra["scheduler"])
        torch.set_rng_state(extra["torch_rng"].cpu())
        if "cuda_rng" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"].cpu(), self.device)
        self.step = json.loads((path / "student.json").read_text())["step"]
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
