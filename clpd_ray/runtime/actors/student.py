"""The student trainer: owns the student model, optimizer and LR schedule.

``train_step`` takes a batch and the current teacher's top-k targets (token-level KD), several
teachers' targets with weights (a soft teacher mixture), or a teacher-generated batch
(sequence-level KD, hard cross-entropy); ``train_steps`` runs several such steps in one call
(the executor's way: one Ray call per D // 2 steps). Targets arrive compact: top-k rows at the
scored positions only (messages.TeacherTargets). A step runs ``train.grad_accum`` micro-batches; each
keeps the body's hidden states at its scored positions and applies the vocabulary projection and
the loss ``distill.loss_chunk`` positions at a time (distill/chunked.py), so the
(positions x vocabulary) logits never exist for the whole batch. Weights and optimizer state are
float32; ``train.precision`` sets the autocast of forward and backward (fp16 adds a gradient
scaler). Checkpoints hold everything a restart needs: model,
optimizer, LR schedule, step and RNG state; the actor writes them (and the final model) to the
run's storage itself, from its own node, so no node needs to see another's disk.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from clpd_ray.config import Config
from clpd_ray.data.batching import encode_examples
from clpd_ray.data.example import AnswerExtractor, Example
from clpd_ray.data.prompt_format import PromptFormat
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.chunked import FlatTargets, chunked_distill_loss, output_head, used_width
from clpd_ray.distill.models import count_parameters, make_model
from clpd_ray.distill.probe import ProbeSet, run_probes
from clpd_ray.distill.state import load_state_strict
from clpd_ray.distill.training import evaluate_accuracy, make_optimizer
from clpd_ray.errors import DivergedError
from clpd_ray.messages import Batch, GeneratedBatch, ProbeResult, StepResult, TeacherTargets
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
        self.fmt = PromptFormat.from_config(config)
        self.extractor = AnswerExtractor.from_config(config)
        self._probe_sets: list[ProbeSet] = []
        self._probe_max_new_tokens = 64
        self._snapshots: dict[int, dict[str, torch.Tensor]] = {}
        self._snapshot_seq = 0
        self._probe_model: PreTrainedModel | None = None
        self.probe_busy_s = 0.0
        self.reset()

    def reset(self) -> int:
        """The state before step 0: seeded model, fresh optimizer and LR schedule, seeded RNG.

        ``__init__`` ends here, so a restarted actor and a reset one are the same. The weights
        are float32 whatever the checkpoint stores (``train.precision`` only sets the autocast
        of forward and backward), so AdamW updates and its state never round to bf16.
        """
        config = self.config
        torch.manual_seed(config.seed)
        model = make_model(self.student_spec, self.tokenizer, seed=config.seed)
        self.model = model.to(device=self.device, dtype=torch.float32)  # type: ignore[call-arg]
        if config.student.gradient_checkpointing:
            _enable_activation_checkpointing(self.model)
        self.model.train()
        # (body, output projection), or None: the logits need post-processing (soft-capping).
        self._head = output_head(self.model)
        s = config.student
        self.opt, self.sched = make_optimizer(
            self.model, s.lr, config.train.total_steps, s.warmup_steps, s.weight_decay
        )
        # fp16 autocast: scale the loss so small gradients survive; a step with inf/NaN
        # gradients is skipped by the scaler (and the scale lowered), which is not divergence.
        self.scaler = torch.amp.GradScaler(
            self.device.type, enabled=config.train.precision == "fp16"
        )
        self.skipped_steps = 0
        self.step = 0
        return self.step

    def __repr__(self) -> str:
        # Safe on a half-built object (Ray calls repr when __init__ raised).
        return (
            f"StudentTrainer(step={getattr(self, 'step', '?')}, "
            f"device={getattr(self, 'device', '?')})"
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        precision = self.config.train.precision
        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def _loss(
        self,
        batch: Batch,
        rows: slice,
        positions: slice,
        targets: Sequence[tuple[np.ndarray, np.ndarray, float, float]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(KD sum, CE sum) over the scored positions of batch rows ``rows``, float32 scalars.

        ``targets``: per teacher (logprobs (N, K), ids (N, K), temperature, weight) over the
        whole batch's N scored positions; ``positions`` selects this micro-batch's share. No
        targets means sequence-level KD: hard CE only. The vocabulary projection and the loss
        run ``distill.loss_chunk`` positions at a time (distill/chunked.py).
        """
        d = self.config.distill
        mask_np = np.asarray(batch.loss_mask[rows], dtype=bool)
        width = used_width(batch.attention_mask[rows], mask_np)  # drop all-padding columns
        ids = torch.as_tensor(batch.input_ids[rows, :width], device=self.device)  # (b, t)
        attn = torch.as_tensor(batch.attention_mask[rows, :width], device=self.device)
        mask = torch.as_tensor(mask_np[:, :width], device=self.device)  # (b, t)
        labels = torch.roll(ids, -1, dims=1)[mask]  # (n,): position t predicts token t+1
        flat = [
            FlatTargets(
                torch.as_tensor(lp[positions], device=self.device),  # (n, K)
                torch.as_tensor(top[positions], device=self.device),  # (n, K)
                temperature,
                weight,
            )
            for lp, top, temperature, weight in targets
        ]
        with self._autocast():
            if self._head is not None:
                base, head = self._head
                hidden = base(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
                rows_in: torch.Tensor = hidden[mask]  # (n, H)
                project: Callable[[torch.Tensor], torch.Tensor] = head
            else:  # post-processed logits: the model's own, for this micro-batch
                logits = self.model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                rows_in, project = logits[mask], _identity  # (n, V_padded)
            return chunked_distill_loss(
                rows_in,
                project,
                flat,
                labels if (not flat or d.ce_weight > 0) else None,
                vocab_size=self.vocab_size,  # drop padded embedding rows
                chunk=d.loss_chunk,
                kind=d.loss,
                tail=d.tail,
                beta=d.beta,
                alpha=d.alpha,
                scale_by_t2=d.scale_by_t2,
            )

    def train_step(
        self,
        batch: Batch | GeneratedBatch,
        *targets: TeacherTargets,
        weights: Sequence[float] | None = None,
    ) -> StepResult:
        """One optimizer step over ``train.grad_accum`` micro-batches of the batch's rows.

        Targets come from Ray already resolved (refs passed as arguments). Every micro-batch's
        loss is divided by the whole batch's scored-token count, so the accumulated gradient,
        and the update, equal those of one pass over the batch.
        """
        result = self._step(batch, targets, weights)
        self._record([result], [targets])
        return result

    def train_steps(
        self,
        layout: Sequence[tuple[int, Sequence[float] | None]],
        *args: Batch | GeneratedBatch | TeacherTargets,
    ) -> tuple[StepResult, ...]:
        """Several consecutive steps in one call, each exactly a :meth:`train_step`.

        ``layout[i] = (n, weights)``: step i takes the next ``1 + n`` of ``args``, its batch
        and its ``n`` teachers' targets (every one an argument of its own, so Ray resolves them
        all before the call). The executor calls this with ``num_returns=len(layout)``: each
        step's result is an object of its own. One call instead of several saves Ray's
        per-call cost (dispatch, argument fetch, result store), which is a tenth of a small
        step's time; a step that raises fails the whole call (the run then replays or stops,
        as for one step).
        """
        steps: list[tuple[Batch | GeneratedBatch, tuple[TeacherTargets, ...], Any]] = []
        at = 0
        for n, weights in layout:  # checked before any step is applied
            batch, targets = args[at], args[at + 1 : at + 1 + n]
            ts = tuple(t for t in targets if isinstance(t, TeacherTargets))
            if not isinstance(batch, (Batch, GeneratedBatch)) or len(ts) != n:
                raise ValueError(
                    f"train_steps: arguments {at}..{at + n} are not a batch and {n} targets"
                )
            steps.append((batch, ts, weights))
            at += 1 + n
        if at != len(args):
            raise ValueError(f"train_steps: the layout takes {at} arguments, got {len(args)}")
        results = [self._step(batch, ts, weights) for batch, ts, weights in steps]
        self._record(results, [ts for _, ts, _ in steps])
        return tuple(results)

    def _record(
        self, results: Sequence[StepResult], targets: Sequence[Sequence[TeacherTargets]]
    ) -> None:
        """Prometheus metrics of the steps of one call: the latest step's loss and learning
        rate, the call's throughput, and the target bytes received (summed per teacher)."""
        last = results[-1]
        busy = sum(r.busy_s for r in results)
        received: dict[str, int] = {}
        for ts in targets:
            for t in ts:
                received[t.teacher] = received.get(t.teacher, 0) + t.nbytes
        self.metrics.student_step(
            last.loss,
            sum(r.tokens for r in results) / max(busy, 1e-9),
            last.lr,
            kd_loss=last.kd_loss,
            ce_loss=last.ce_loss,
            target_bytes=received,
            steps=len(results),
        )

    def _step(
        self,
        batch: Batch | GeneratedBatch,
        targets: Sequence[TeacherTargets],
        weights: Sequence[float] | None,
    ) -> StepResult:
        """The body of :meth:`train_step`; ``busy_s`` counts its time."""
        start = time.perf_counter()
        if isinstance(batch, GeneratedBatch):
            batch = batch.batch
        if weights is None:
            weights = [1.0 / len(targets)] * len(targets) if targets else []
        d = self.config.distill
        loss_mask = np.asarray(batch.loss_mask, dtype=bool)
        per_teacher = [
            (*t.at_positions(loss_mask), t.temperature, w)
            for t, w in zip(targets, weights, strict=True)
        ]
        tokens = batch.num_target_tokens
        denom = float(max(tokens, 1))
        ce_weight = d.ce_weight if targets else 1.0  # sequence-level KD: hard CE only
        offsets = np.concatenate([[0], np.cumsum(loss_mask.sum(1))])  # row -> first position
        self.opt.zero_grad(set_to_none=True)
        kd_sum, ce_sum = 0.0, 0.0
        n_rows = loss_mask.shape[0]
        for part in np.array_split(np.arange(n_rows), min(self.config.train.grad_accum, n_rows)):
            rows = slice(int(part[0]), int(part[-1]) + 1)
            positions = slice(int(offsets[rows.start]), int(offsets[rows.stop]))
            if positions.start == positions.stop and tokens:
                continue  # nothing scored here: contributes nothing to the batch's gradient
            kd, ce = self._loss(batch, rows, positions, per_teacher)
            self.scaler.scale((kd + ce_weight * ce) / denom).backward()
            kd_sum += float(kd.detach())
            ce_sum += float(ce.detach())
        kd_mean, ce_mean = kd_sum / denom, ce_sum / denom
        loss = kd_mean + ce_weight * ce_mean
        self.scaler.unscale_(self.opt)  # no-op unless fp16: clip the true gradients
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        finite_grad = bool(torch.isfinite(grad_norm))
        if not (np.isfinite(loss) and (finite_grad or self.scaler.is_enabled())):
            # Stop before the optimizer writes NaN into every weight.
            self.opt.zero_grad(set_to_none=True)
            raise DivergedError(
                diverged_message(
                    self.config,
                    batch.step,
                    torch.tensor(loss),
                    kd_mean if targets else 0.0,
                    ce_mean,
                    grad_norm,
                )
            )
        if not finite_grad:
            self.skipped_steps += 1  # fp16 overflow: the scaler skips it and lowers its scale
        self.scaler.step(self.opt)
        self.scaler.update()
        lr = float(self.sched.get_last_lr()[0])
        with warnings.catch_warnings():  # a skipped fp16 step still advances the schedule
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
            self.sched.step()
        self.step += 1
        elapsed = time.perf_counter() - start
        self.busy_s += elapsed
        kd_report = kd_mean if targets else 0.0
        ce_report = ce_mean if (not targets or d.ce_weight > 0) else 0.0
        return StepResult(
            step=batch.step,
            loss=loss,
            kd_loss=kd_report,
            ce_loss=ce_report,
            lr=lr,
            tokens=tokens,
            busy_s=elapsed,
        )

    def evaluate(self, examples: Sequence[Example], max_new_tokens: int) -> dict:
        """Answer accuracy of greedy generations, overall and by difficulty, with predictions."""
        return evaluate_accuracy(
            self.model,
            self.tokenizer,
            examples,
            max_new_tokens=max_new_tokens,
            fmt=self.fmt,
            extractor=self.extractor,
        )

    def weights(self) -> dict[str, np.ndarray]:
        """The student's parameters as numpy arrays (zero-copy through the object store)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}

    # ------------------------------------------------------------------ probes
    # Probes run where the weights are: ``snapshot`` (in the actor's default group, so queued in
    # order right after the step it measures) copies the weights on the device; ``probe`` (in
    # the "probe" concurrency group, its own thread) measures that copy while training goes on.
    # No weights cross the object store.

    def set_probes(
        self,
        probe_sets: Sequence[Sequence[Example]],
        teacher_probe_targets: Sequence[Sequence[TeacherTargets]],
        max_new_tokens: int,
    ) -> None:
        """Per-stage probe sets, and ``teacher_probe_targets[i][s]``: teacher i's targets on set s."""
        self._probe_sets = [
            ProbeSet(
                stage=s,
                examples=tuple(examples),
                encoded=encode_examples(self.tokenizer, examples, fmt=self.fmt),
                teacher_targets=tuple(per_teacher[s] for per_teacher in teacher_probe_targets),
            )
            for s, examples in enumerate(probe_sets)
        ]
        self._probe_max_new_tokens = max_new_tokens

    def snapshot(self) -> int:
        """Keep a device-local copy of the current weights; returns its token for :meth:`probe`."""
        if self._probe_model is None:  # made here, on the training thread, never while it trains
            self._probe_model = copy.deepcopy(self.model).requires_grad_(False)
            for p in self._probe_model.parameters():
                p.grad = None
        self._snapshot_seq += 1  # a token, not the step: a replay may probe the same step again
        self._snapshots[self._snapshot_seq] = {
            k: v.detach().clone() for k, v in self.model.state_dict().items()
        }
        return self._snapshot_seq

    def probe(self, step: int, snapshot: int) -> tuple[ProbeResult, ...]:
        """Measure the :meth:`snapshot` taken after ``step`` on every probe set (the token is
        passed as an ObjectRef, so Ray starts this only once the snapshot exists)."""
        start = time.perf_counter()
        weights = self._snapshots.pop(snapshot)
        assert self._probe_model is not None
        load_state_strict(self._probe_model, weights, what=f"the student's weights at step {step}")
        del weights
        results = run_probes(
            self._probe_model,
            self.tokenizer,
            self._probe_sets,
            max_new_tokens=self._probe_max_new_tokens,
            fmt=self.fmt,
            extractor=self.extractor,
        )
        self.probe_busy_s += time.perf_counter() - start
        self.metrics.probe(results, [t.teacher for t in self._probe_sets[0].teacher_targets])
        return results

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
            if self.scaler.is_enabled():  # fp16: the loss scale is training state too
                extra["grad_scaler"] = self.scaler.state_dict()
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
        if "grad_scaler" in extra and self.scaler.is_enabled():
            self.scaler.load_state_dict(extra["grad_scaler"])
        torch.set_rng_state(extra["torch_rng"].cpu())
        if "cuda_rng" in extra and self.device.type == "cuda":
            torch.cuda.set_rng_state(extra["cuda_rng"].cpu(), self.device)
        self.step = int(meta["step"])
        return self.step

    def stats(self) -> dict:
        return {
            "step": self.step,
            "busy_s": self.busy_s,
            "probe_busy_s": self.probe_busy_s,
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


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward (transformers' own checkpointing)."""
    kwargs = {"use_reentrant": False}  # reentrant checkpoints drop grads of no-grad inputs
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)  # type: ignore[operator]
