"""The scheduler service: hosts a scheduling policy and measures the student on probe sets.

The policy only decides (pure, no I/O); this service does the rest: it checks every decision,
records the schedule as Ray metrics, and evaluates small per-stage probe sets with a snapshot of
the student's weights, off the student's critical path. Probe results feed later observations.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedModel

from clpd_ray.config import ModelSpec
from clpd_ray.data.batching import Encoded, encode_examples
from clpd_ray.data.example import Example
from clpd_ray.data.tokenizer import load_tokenizer
from clpd_ray.distill.losses import sparse_kd_loss
from clpd_ray.distill.models import make_model
from clpd_ray.distill.state import load_state_strict
from clpd_ray.distill.training import evaluate_accuracy, masked_nll, to_torch
from clpd_ray.errors import ClpdError
from clpd_ray.messages import Decision, Observation, ProbeResult, TeacherTargets
from clpd_ray.policies import SchedulerPolicy, check_decision, resolve_policy
from clpd_ray.policies.guard import bind_policy, is_builtin, policy_call_error, policy_state
from clpd_ray.runtime.actors.device import pick_device, set_threads
from clpd_ray.runtime.metrics import RunMetrics
from clpd_ray.runtime.models_store import fetch, fetch_spec

__all__ = ["SchedulerService"]


class SchedulerService:
    def __init__(
        self,
        policy: str | type[SchedulerPolicy] | SchedulerPolicy,
        policy_kwargs: dict[str, Any] | None,
        *,
        num_stages: int,
        teacher_names: Sequence[str],
        total_steps: int,
        student_spec: ModelSpec,
        tokenizer_dir: str | Path,
        run_id: str = "local",
        threads: int | None = 1,
    ) -> None:
        set_threads(threads)
        self.policy = bind_policy(
            resolve_policy(policy, policy_kwargs),
            num_stages=num_stages,
            num_teachers=len(teacher_names),
            total_steps=total_steps,
        )
        self.num_stages = num_stages
        self.teacher_names = list(teacher_names)
        self.device = pick_device()
        self.metrics = RunMetrics(run_id)
        self.max_new_tokens = 64
        self.probe_sets: list[list[Example]] = []
        self.teacher_probe_targets: list[list[TeacherTargets]] = []
        self._student_spec = student_spec
        self._tokenizer_dir = tokenizer_dir
        self._probe_model: PreTrainedModel | None = None
        self._encoded: list[Encoded] | None = None
        self.busy_s = 0.0

    def __repr__(self) -> str:
        # Safe on a half-built object (Ray calls repr when __init__ raised).
        policy = getattr(getattr(self, "policy", None), "name", "?")
        teachers = len(getattr(self, "teacher_names", ()))
        return (
            f"SchedulerService(policy={policy}, stages={getattr(self, 'num_stages', '?')}, "
            f"teachers={teachers})"
        )

    @property
    def policy_name(self) -> str:
        return self.policy.name

    def info(self) -> dict:
        return {"policy": self.policy.name, "curriculum": self.policy.curriculum}

    def decide(self, obs: Observation) -> tuple[Decision, dict]:
        """The checked decision for ``obs`` and the policy state *before* it (for checkpoints)."""
        before = policy_state(self.policy)  # JSON-ready: numpy numbers become plain ones
        try:
            raw = self.policy.decide(obs)
        except ClpdError:
            raise
        except Exception as err:
            if is_builtin(type(self.policy)):
                raise  # a bug in a built-in policy: an internal error, with its traceback
            call = f"decide() at step {obs.step}"
            raise policy_call_error(self.policy.name, type(self.policy), call, err) from None
        decision = check_decision(self.policy.name, raw, self.num_stages, len(self.teacher_names))
        self.metrics.schedule(
            decision.stage, decision.teacher, self.teacher_names[decision.teacher]
        )
        return decision, before

    def state_dict(self) -> dict:
        return policy_state(self.policy)

    def load_state_dict(self, state: dict) -> None:
        """Put the policy back where a checkpoint left it (after a restart, resume or rewind)."""
        self.policy.load_state_dict(state)

    def set_probes(
        self,
        probe_sets: Sequence[Sequence[Example]],
        teacher_probe_targets: Sequence[Sequence[TeacherTargets]],
        max_new_tokens: int,
    ) -> None:
        """Per-stage probe sets, and ``teacher_probe_targets[i][s]``: teacher i's targets on set s."""
        self.probe_sets = [list(p) for p in probe_sets]
        self.teacher_probe_targets = [list(t) for t in teacher_probe_targets]
        self.max_new_tokens = max_new_tokens
        self._encoded = None

    def _model(self) -> PreTrainedModel:
        if self._probe_model is None:
            self.tokenizer = load_tokenizer(fetch(self._tokenizer_dir))
            self._probe_model = (
                make_model(fetch_spec(self._student_spec), self.tokenizer).to(self.device).eval()  # type: ignore[arg-type]
            )
        if self._encoded is None:  # first probe, or set_probes again (after a recovery)
            self._encoded = [encode_examples(self.tokenizer, p) for p in self.probe_sets]
        return self._probe_model

    @torch.inference_mode()
    def probe(self, step: int, weights: dict[str, np.ndarray]) -> tuple[ProbeResult, ...]:
        """Measure a snapshot of the student on every stage's probe set."""
        start = time.perf_counter()
        model = self._model()
        snapshot = {k: torch.as_tensor(v) for k, v in weights.items()}
        load_state_strict(model, snapshot, what=f"the student's weights at step {step}")
        results: list[ProbeResult] = []
        assert self._encoded is not None
        for s, (examples, enc) in enumerate(zip(self.probe_sets, self._encoded, strict=True)):
            batch = to_torch(enc, self.device)
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            logits = logits[..., : len(self.tokenizer)]  # (B, T, V)
            loss = float(masked_nll(logits, batch["input_ids"], batch["loss_mask"]).mean())
            kls = []
            for per_stage in self.teacher_probe_targets:
                t = per_stage[s]
                kl = sparse_kd_loss(
                    logits,
                    torch.as_tensor(t.logprobs, device=self.device),
                    torch.as_tensor(t.ids, device=self.device),
                    batch["loss_mask"],
                    "fkl",
                    temperature=t.temperature,
                )
                kls.append(float(kl))
            acc = evaluate_accuracy(
                model, self.tokenizer, examples, max_new_tokens=self.max_new_tokens
            )
            results.append(
                ProbeResult(stage=s, loss=loss, accuracy=acc["accuracy"], kl_to_teacher=tuple(kls))
            )
        self.busy_s += time.perf_counter() - start
        return tuple(results)

    def stats(self) -> dict:
        return {"busy_s": self.busy_s}

    def pid(self) -> int:
        return os.getpid()
