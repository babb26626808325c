"""Typed run configuration, loaded from YAML once and validated at load.

Every default lives here and nowhere else. ``load_config(path, overrides)`` reads a YAML file,
applies ``a.b=c`` overrides (values parsed as YAML scalars), and validates. Any mistake raises
:class:`~clpd_ray.errors.ConfigError` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import itertools
import math
import os
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from clpd_ray._yaml import DuplicateKeyError, NotUtf8Error, decode_utf8, parse_yaml
from clpd_ray.errors import ConfigError

__all__ = [
    "SEED_MAX",
    "ClusterConfig",
    "Config",
    "CurriculumConfig",
    "DataConfig",
    "DistillConfig",
    "ModelSpec",
    "ReportTo",
    "SchedulerConfig",
    "StudentConfig",
    "TaskConfig",
    "TeacherSpec",
    "TeachersConfig",
    "TrainConfig",
    "apply_overrides",
    "check_path_name",
    "default_cache_dir",
    "load_config",
]

LossKind = Literal["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"]
TailMode = Literal["renormalise", "zero", "tail_bucket"]
# Experiment trackers that also get the training rows (runtime/tracking.py).
ReportTo = Literal["jsonl", "tensorboard", "wandb", "mlflow"]

# The seed feeds numpy Generators (>= 0 only), torch.manual_seed (< 2**64) and seed offsets;
# 2**32 - 1 is the range every one of them, and numpy's legacy np.random.seed, accepts.
SEED_MAX = 2**32 - 1
# A name that becomes a file, directory or actor name: no separators, never "." or "..".
_PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_path_name(name: str, what: str) -> str:
    """``name`` if it is safe as one path component, else ValueError naming ``what`` and the fix.

    Teacher names become cache directories (``<cache>/teachers/<name>-<key>``) and actor names,
    so a name like ``../x`` could read, write or delete outside the cache.
    """
    if not _PATH_NAME.fullmatch(name):
        raise ValueError(
            f"{what} {name!r} cannot be used: it names files and directories, so it must be 1-64 "
            f"letters, digits, '.', '_' or '-', starting with a letter or digit (no '/', no "
            f"spaces, not '.' or '..'); rename it, e.g. 't-large'"
        )
    return name


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # Lax mode would read YAML `true` as 1 for a number; a bool there is always a mistake.
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(value, bool) and field is not None:
            allowed = get_args(field.annotation) or (field.annotation,)
            if bool not in allowed and any(t in (int, float) for t in allowed):
                raise ValueError(f"expected a number, got the boolean {value}")
        return value


class ModelSpec(_Strict):
    """A causal LM: either a path / hub id to load, or a tiny architecture to build."""

    path: str | None = None
    # For a built model (no path): the tokenizer it is sized for, a save_pretrained directory
    # or hub id (e.g. a Qwen tokenizer); unset = the embedded task's character tokenizer.
    tokenizer: str | None = None
    arch: Literal["gpt2", "llama", "qwen2", "qwen3"] = "gpt2"
    # Embedding rows of a built model; unset = the tokenizer's length. Qwen checkpoints pad their
    # 151,669 tokens to 151,936 rows (7B: 152,064); logits are sliced to the tokenizer anyway.
    vocab_size: int | None = Field(None, ge=2)
    n_layer: int = Field(2, ge=1, le=48)
    n_embd: int = Field(64, ge=8, le=8192)
    n_head: int = Field(2, ge=1, le=128)
    max_positions: int = Field(128, ge=16, le=32768)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.path is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        return self


class TeacherSpec(ModelSpec):
    name: str = Field(min_length=1)
    train_steps: int = Field(1500, ge=1)
    lr: float = Field(3e-3, gt=0, le=1.0)
    # Actors serving this teacher behind one name, load-balanced, each with its own bundle (its
    # own GPU on a GPU cluster); the targets do not depend on which one computed them.
    replicas: int = Field(1, ge=1, le=64)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        return check_path_name(name, "teacher name")


TaskName = Literal["modchain", "addition"]  # data/task.py TASKS


class TaskConfig(_Strict):
    """The embedded synthetic reasoning task (used when ``data.path`` is unset)."""

    # modchain: chained arithmetic mod 10 (data/task.py); addition: multi-digit addition with the
    # carries as CoT (data/addition.py). Difficulty k = CoT steps for both.
    name: TaskName = "modchain"
    max_difficulty: int = Field(6, ge=1, le=16)
    train_size: int = Field(20000, ge=10)
    eval_size: int = Field(600, ge=10)


Preset = Literal["gsm8k", "svamp", "aqua", "strategyqa", "mawps"]
AnswerType = Literal["number", "choice", "boolean", "text"]


class DataConfig(_Strict):
    """An external dataset loaded with Hugging Face ``datasets`` (overrides the embedded task).

    ``preset`` fills the field mapping, CoT-step difficulty and answer extractor of a known
    dataset (data/presets.py); keys given explicitly override the preset.
    """

    # A .json/.jsonl/.parquet file, a save_to_disk directory, or a sample shipped in the package:
    # "sample:gsm8k/train.jsonl" (and "sample:gsm8k/test.jsonl" for eval_path).
    path: str | None = None
    preset: Preset | None = None
    # Evaluation only; unset: eval_fraction of data.path is held out for evaluation.
    eval_path: str | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)
    # Training-side rows held out for the scheduler's probes (never trained on, never evaluated).
    probe_rows: int = Field(200, ge=1)
    # Use at most this many training / evaluation rows (first rows after loading); unset = all.
    max_train_rows: int | None = Field(None, ge=2)
    max_eval_rows: int | None = Field(None, ge=1)
    prompt_field: str = "question"
    # A prompt built from several fields, e.g. "{Body} {Question}" (list fields are joined by
    # spaces); set, it replaces prompt_field.
    prompt_template: str | None = None
    cot_field: str = "answer"
    answer_field: str | None = None
    # Reasoning steps of a CoT: its lines, GSM8K <<calc>> annotations, or an equation's operators.
    cot_steps: Literal["lines", "calc", "ops"] = "lines"
    # How a final answer is read and compared: numbers (commas, $, %, .0 normalised),
    # choice letters (A-E), booleans (yes/no/true/false) or exact text. \boxed{} is always read.
    answer_type: AnswerType = "number"
    # With no '#### N' or \boxed{} answer, take the last answer-like token of the text: the last
    # number (choices: the last "(C)" / "C)"; booleans: the last yes/no). Only if the preset or the
    # user says so: it rewards chains that merely mention the answer.
    last_number_fallback: bool = False
    # Format question and chain of thought with the tokenizer's chat template (user turn /
    # assistant turn, loss on assistant tokens only; Qwen3's thinking is switched off); off: the
    # plain "Question: ...\nAnswer: ..." text.
    chat_template: bool = False
    system_prompt: str | None = None  # chat format only: a system turn before the question

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        from clpd_ray.data.presets import apply_preset

        return apply_preset(raw)  # explicit keys override the preset

    @model_validator(mode="after")
    def _system_prompt_needs_chat(self) -> DataConfig:
        if self.system_prompt is not None and not self.chat_template:
            raise ValueError(
                "data.system_prompt is set but data.chat_template is false: the plain format has "
                "no system turn, so it would be ignored; set data.chat_template: true or drop "
                "data.system_prompt"
            )
        return self

    @field_validator("prompt_template")
    @classmethod
    def _template_names_fields(cls, template: str | None) -> str | None:
        if template is None:
            return None
        from clpd_ray.data.presets import template_fields

        template_fields(template)  # ValueError with the fix if it is malformed
        return template


class TeachersConfig(_Strict):
    """The teacher ladder, weakest first."""

    ladder: list[TeacherSpec] = Field(
        default_factory=lambda: [
            TeacherSpec(name="t-small", n_layer=2, n_embd=24, n_head=2),
            TeacherSpec(name="t-medium", n_layer=2, n_embd=32, n_head=2),
            TeacherSpec(name="t-large", n_layer=2, n_embd=64, n_head=4),
        ],
        min_length=1,
    )
    batch_size: int = Field(64, ge=1)
    cache_dir: str | None = None
    # A cap on the train_steps of built teachers (a smoke-test ladder: `--quick` sets 400); the
    # capped teachers are cached apart from the full ones. Unset: each teacher's own train_steps.
    max_train_steps: int | None = Field(None, ge=1)
    top_k: int = Field(16, ge=1)
    resident: Literal["all", "needed"] = "all"
    # Weights of loaded teachers (built ones are float32). "auto": as the checkpoint stores them.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    # Rows per teacher forward pass; the top-k is taken chunk by chunk, so the full-vocabulary
    # logits exist for one micro-batch only.
    micro_batch: int = Field(8, ge=1)
    # Precision of the top-k log-probabilities sent to the student (ids are int32).
    target_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    # Per-example top-k targets, stored and reused (runtime/target_store.py). Unset: none for a
    # run (each batch computed whole, micro_batch rows per forward pass: what a GPU teacher is
    # fastest at), one store shared by every arm and seed for `clpd ablate`; "run": in the run's
    # storage (<run>/targets, kept across restarts and --resume); a local path or s3:// URI: a
    # store shared by every run that names it; "off": none, also in an ablation. With a store
    # each example is computed alone (the same forward pass whatever batch it is in), so a stored
    # target is bit-for-bit what any batch would get, at the price of batching.
    target_store: str | None = None
    # Teachers whose stage has not come yet compute their future examples' targets into the
    # store, in the sampler's order, one batch at a time between the run's requests.
    work_ahead: bool = True

    @field_validator("target_store", mode="before")
    @classmethod
    def _store_switch(cls, value: Any) -> Any:
        # YAML reads a bare `off` / `no` as false and `on` / `yes` as true.
        if isinstance(value, bool):
            return None if value else "off"
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "is empty; give a local path or s3:// URI for a shared store, 'run' for "
                "<run>/targets, 'off' for none, or leave it unset (none; shared in an ablation)"
            )
        return value


class StudentConfig(ModelSpec):
    lr: float = Field(3e-3, gt=0, le=1.0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(20, ge=0)
    # Recompute activations in the backward pass (less memory, ~30% more compute).
    gradient_checkpointing: bool = False


class DistillConfig(_Strict):
    # token: the teacher's top-k distribution per token; sequence: the teacher's generated chain
    # (below); sft: no teacher at all, hard cross-entropy on the reference chain of thought (the
    # no-teacher baseline: the `sft` arm of `clpd ablate`); no teacher actor is placed or started,
    # and a policy's probes have no teacher part (no KL to a teacher, no teacher accuracy).
    objective: Literal["token", "sequence", "sft"] = "token"
    loss: LossKind = "fkl"
    beta: float = Field(0.5, gt=0, lt=1)
    alpha: float = Field(0.1, ge=0, lt=1)
    temperature: float = Field(1.0, gt=0, le=100)
    scale_by_t2: bool = False
    ce_weight: float = Field(0.0, ge=0)
    tail: TailMode = "renormalise"
    # Loss positions per chunk of the student's vocabulary projection: the (positions x vocab)
    # fp32 tensor exists for one chunk at a time, never for the whole batch.
    loss_chunk: int = Field(1024, ge=1)
    # Sequence-level KD (distill/sequence.py): the teacher's chain of thought is generated, then
    # re-tokenized with the student's tokenizer (works across tokenizer families).
    # Unset: the longest held-out reference answer + 1, counted in each teacher's own tokens.
    max_new_tokens: int | None = Field(None, ge=1)
    decoding: Literal["greedy", "sample"] = "greedy"  # sample: seeded by (seed, step)
    sample_temperature: float = Field(1.0, gt=0, le=10)
    # Keep only generated chains whose extracted answer equals the gold answer.
    verify: bool = False
    # A rejected chain: train on the gold CoT, or skip the row (a step with no row left trains on
    # the gold CoTs).
    on_reject: Literal["gold", "skip"] = "gold"


class CurriculumConfig(_Strict):
    num_stages: int = Field(3, ge=1, le=64)
    scorer: Literal["steps", "length", "student_loss", "fusion"] = "steps"
    # Difficulty-score thresholds: stage k holds scores in (b[k-1], b[k]] (curriculum.sampler).
    boundaries: list[float] | None = None
    replay: float = Field(0.0, ge=0, lt=1)

    @field_validator("boundaries")
    @classmethod
    def _finite(cls, bounds: list[float] | None) -> list[float] | None:
        if bounds is not None and not all(math.isfinite(b) for b in bounds):
            raise ValueError(
                f"{bounds} holds a value that is not a finite number; give "
                f"finite difficulty scores where stages 1, 2, ... start, e.g. [2.5, 4.5], or drop "
                f"the key for quantile stages"
            )
        return bounds


class SchedulerConfig(_Strict):
    policy: str = "clpd"
    kwargs: dict[str, Any] = Field(default_factory=dict)
    probe_every: int = Field(50, ge=1)
    probe_size: int = Field(32, ge=1)
    # Seconds one policy call (decide, state_dict, load_state_dict) may take before the run stops.
    timeout_s: float = Field(300.0, gt=0)


class TrainConfig(_Strict):
    total_steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1)
    prefetch: int = Field(4, ge=1, le=64)
    # Micro-batches per optimizer step (batch_size must divide evenly): the same update as one
    # batch of batch_size, with the memory of one micro-batch.
    grad_accum: int = Field(1, ge=1)
    # Longest example in tokens (prompt + target + eos); unset = the student's max positions.
    max_length: int | None = Field(None, ge=8)
    overlong: Literal["truncate", "drop"] = "truncate"  # what happens to longer examples
    # Autocast precision of the student's forward/backward; master weights and optimizer state
    # stay float32 (fp16 adds a gradient scaler).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)
    checkpoint_every: int = Field(200, ge=0)
    # Committed checkpoints kept in the run directory (older ones are deleted after each commit).
    keep_checkpoints: int = Field(2, ge=1)
    # Where the training rows, decisions, evaluations and final tables also go. The run
    # directory's jsonl files are written whatever this says (status and --resume read them).
    report_to: list[ReportTo] = Field(default_factory=lambda: list[ReportTo](["jsonl"]))

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # --set train.report_to=wandb

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"{names} names {', '.join(twice)} more than once; list each once")
        return names


class ClusterConfig(_Strict):
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)
    gpus_per_actor: float = Field(1.0, ge=0, le=8)
    dashboard_host: str = "127.0.0.1"


class Config(_Strict):
    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teachers: TeachersConfig = Field(default_factory=TeachersConfig)
    student: StudentConfig = Field(
        default_factory=lambda: StudentConfig(n_layer=2, n_embd=32, n_head=2)
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)
    curriculum: CurriculumConfig = Field(default_factory=CurriculumConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        if not 0 <= seed <= SEED_MAX:
            raise ValueError(
                f"{seed} is out of range; use an integer in [0, {SEED_MAX}] (0 to 2**32 - 1, "
                f"what numpy and torch seeding both accept)"
            )
        return seed

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        names = [t.name for t in self.teachers.ladder]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}")
        bounds = self.curriculum.boundaries
        if bounds is not None:
            if len(bounds) != self.curriculum.num_stages - 1:
                raise ValueError(
                    f"curriculum.boundaries has {len(bounds)} values; num_stages="
                    f"{self.curriculum.num_stages} needs {self.curriculum.num_stages - 1}"
                )
            if any(b >= a for b, a in itertools.pairwise(bounds)):
                raise ValueError(f"curriculum.boundaries must be strictly increasing, got {bounds}")
        t = self.train
        if t.batch_size % t.grad_accum:
            raise ValueError(
                f"train.batch_size={t.batch_size} is not a multiple of train.grad_accum="
                f"{t.grad_accum}; each optimizer step splits the batch into grad_accum equal "
                f"micro-batches, so pick e.g. grad_accum={_divisor_near(t.batch_size, t.grad_accum)}"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _divisor_near(n: int, k: int) -> int:
    """The divisor of ``n`` closest to ``k`` (a valid train.grad_accum to suggest)."""
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def default_cache_dir(config: Config | None = None) -> Path:
    """The teacher cache: config ``teachers.cache_dir``, else ``$CLPD_CACHE``, else ~/.cache/clpd_ray."""
    if config is not None and config.teachers.cache_dir:
        return Path(config.teachers.cache_dir).expanduser()
    env = os.environ.get("CLPD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clpd_ray"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides to a nested dict; values are parsed as YAML scalars."""
    out = _deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--set {item!r}: expected key=value, e.g. --set train.total_steps=100"
            )
        parts = key.strip().split(".")
        node = out
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {'.'.join(parts[:-1])} is not a section")
            node = child
        try:
            node[parts[-1]] = parse_yaml(value) if value != "" else ""
        except DuplicateKeyError as err:
            twice = ".".join([*parts, err.key])
            raise ConfigError(
                f"--set {item!r}: key {twice!r} is given twice; give it once"
            ) from None
        except yaml.YAMLError:
            node[parts[-1]] = value
    return out


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def _format_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        kind = e["type"]
        value = e.get("input")
        if kind == "extra_forbidden":
            lines.append(f"{source}: unknown key '{loc}'; remove it or check its spelling")
        elif kind == "value_error":
            lines.append(f"{source}: {loc or 'config'}: {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"{source}: key '{loc}' has bad value {value!r}: {e['msg']}")
    return "\n".join(lines)


def config_from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}"
        )
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def _read_yaml_file(p: Path) -> Any:
    """The parsed YAML file ``p``; every way it can be unreadable is a ConfigError naming it."""
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(
            f"cannot read config file {p}: {err.strerror}; check its permissions"
        ) from None
    try:
        return parse_yaml(decode_utf8(data))
    except NotUtf8Error as err:
        raise ConfigError(
            f"{p}: not UTF-8 text: {err} is not valid UTF-8; save the file as UTF-8"
        ) from None
    except DuplicateKeyError as err:
        raise ConfigError(
            f"{p}: {err}; YAML would keep only the last one and silently drop the settings of "
            f"the first: merge them into one"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: not valid YAML{where}; fix the syntax") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load, override and validate a config. ``path=None`` gives the defaults."""
    raw: Any = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file")
        raw = _read_yaml_file(p) or {}
    if overrides:
        if not isinstance(raw, dict):
            raise ConfigError(
                f"{source}: the top level must be a mapping of sections, got {type(raw).__name__}"
            )
        raw = apply_overrides(raw, overrides)
        source += " (with --set overrides)"
    return config_from_dict(raw, source)


def save_config(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
