"""The embedded synthetic reasoning task: chained modular arithmetic with a chain of thought.

An example of difficulty k applies k operations to a start digit, modulo 10::

    prompt  "7+3*2-4?"                      (start digit, then k (op, digit) pairs, then '?')
    target  "7+3=0;0*2=0;0-4=6;#6"          (one CoT step per operation, then '#answer')

Each step must find the i-th operation in the prompt (a positional look-up that needs attention
over a distance that grows with k) and apply a 10x10 table for that operator. One step error
ruins the answer, so accuracy falls roughly like p**k with per-step accuracy p, and p grows with
model capacity: harder items need more capacity, which gives the teacher ladder its gradient.
The CoT step count k is the CoT-derived difficulty (1..max_difficulty). Generation is
deterministic by seed.

This is the default embedded task (``task.name: modchain``); :mod:`clpd_ray.data.addition` is
the second (``task.name: addition``). :func:`synthetic_task` names both, and
:func:`held_out_split` below draws held-out problems for either.

Held-out problems: separate random streams do not make separate problems. Level k has only
``10 * 30**k`` distinct problems (300 at k=1, 9,000 at k=2), so a 20,000-row training set holds
every k=1 problem and about a third of the k=2 ones. :func:`held_out_split` therefore draws the
evaluation and probe problems *without replacement from the problems the training set does not
hold* (and evaluation and probe problems from disjoint sets), so they are disjoint from training
by construction, deduplicated on the prompt. A level with too few unseen problems to fill its
share (k=1 at the demo's size) cannot be held out: it is left out of evaluation and probes and
listed as "seen", so no reported held-out number includes it. The training set is drawn exactly
as before (the same stream, the same rows).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from clpd_ray.data.addition import ADDITION
from clpd_ray.data.example import Example
from clpd_ray.data.synthetic import SyntheticTask, balanced_levels, split_rng

__all__ = [
    "HELD_OUT_SPLIT",
    "MODCHAIN",
    "OPERATORS",
    "TASKS",
    "TASK_ALPHABET",
    "HeldOut",
    "TooFewProblems",
    "generate_examples",
    "held_out_split",
    "make_example",
    "problem_index",
    "problem_space",
    "solve",
    "synthetic_task",
]

OPERATORS = ("+", "-", "*")
TASK_ALPHABET = "0123456789+-*=;?#"
_MOD = 10


def _apply(a: int, op: str, b: int) -> int:
    if op == "+":
        return (a + b) % _MOD
    if op == "-":
        return (a - b) % _MOD
    return (a * b) % _MOD


def solve(start: int, ops: list[tuple[str, int]]) -> tuple[str, int]:
    """The chain of thought and final value for a start digit and a list of (op, digit)."""
    value = start
    steps = []
    for op, b in ops:
        nxt = _apply(value, op, b)
        steps.append(f"{value}{op}{b}={nxt};")
        value = nxt
    return "".join(steps), value


def make_example(start: int, ops: list[tuple[str, int]]) -> Example:
    prompt = f"{start}" + "".join(f"{op}{b}" for op, b in ops) + "?"
    cot, value = solve(start, ops)
    return Example(prompt=prompt, target=f"{cot}#{value}", answer=str(value), steps=len(ops))


def generate_examples(
    n: int, max_difficulty: int, seed: int, split: str = "train"
) -> list[Example]:
    """``n`` examples with difficulty uniform over 1..max_difficulty, deterministic by seed.

    ``split`` selects an independent random stream, so "train" and "eval" never share a stream.
    """
    rng = split_rng(seed, split)
    ks = balanced_levels(rng, n, range(1, max_difficulty + 1))
    out = []
    for k in ks:
        start = int(rng.integers(0, _MOD))
        ops = [
            (OPERATORS[int(rng.integers(0, len(OPERATORS)))], int(rng.integers(0, _MOD)))
            for _ in range(int(k))
        ]
        out.append(make_example(start, ops))
    return out


# ---------------------------------------------------------------------------- held-out problems

# Names how held_out_split draws; teacher caches key on it (their accuracy.json is measured on
# the evaluation set), so change it whenever the evaluation or probe sets would change.
HELD_OUT_SPLIT = "disjoint-1"
_ENUMERATE_UP_TO = 2_000_000  # levels this small are sampled by listing their unseen problems
_PAIRS = len(OPERATORS) * _MOD  # (op, digit) choices per step


def problem_space(k: int) -> int:
    """The number of distinct problems of difficulty ``k``: a start digit and k (op, digit)."""
    return _MOD * _PAIRS**k


def problem_index(prompt: str) -> tuple[int, int]:
    """(difficulty k, index in [0, problem_space(k))) of an embedded-task prompt like "7+3*2?".

    The index is the start digit plus the base-30 digits of the (op, digit) pairs; it is the
    inverse of :func:`_from_index`."""
    body = prompt.removesuffix("?")
    if not body or len(body) % 2 != 1 or not body[0].isdigit():
        raise ValueError(f"{prompt!r} is not an embedded-task prompt such as '7+3*2?'")
    index, scale = int(body[0]), _MOD
    for i in range(1, len(body), 2):
        op, digit = body[i], body[i + 1]
        if op not in OPERATORS or not digit.isdigit():
            raise ValueError(f"{prompt!r} is not an embedded-task prompt such as '7+3*2?'")
        index += (OPERATORS.index(op) * _MOD + int(digit)) * scale
        scale *= _PAIRS
    return len(body) // 2, index


def _from_index(k: int, index: int) -> Example:
    start, rest = index % _MOD, index // _MOD
    ops = []
    for _ in range(k):
        rest, pair = divmod(rest, _PAIRS)
        ops.append((OPERATORS[pair // _MOD], pair % _MOD))
    return make_example(start, ops)


MODCHAIN = SyntheticTask(
    name="modchain",
    generate=generate_examples,
    space=problem_space,
    index=problem_index,
    from_index=_from_index,
)
TASKS = {t.name: t for t in (MODCHAIN, ADDITION)}  # task.name -> the task


def synthetic_task(name: str) -> SyntheticTask:
    """The embedded task called ``name`` (config ``task.name``)."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; the embedded tasks are {sorted(TASKS)}") from None


def _draw_unseen(
    rng: np.random.Generator, space: int, k: int, count: int, taken: set[int]
) -> list[int]:
    """``count`` distinct problem indices of level k (``space`` problems) not in ``taken``
    (which gains them)."""
    if count > space - len(taken):
        raise ValueError(f"level {k} has {space - len(taken)} unseen problems, {count} asked for")
    if space <= _ENUMERATE_UP_TO:
        free = np.setdiff1d(np.arange(space), np.fromiter(taken, np.int64, len(taken)))
        chosen = [int(i) for i in rng.choice(free, size=count, replace=False)]
    else:  # a vast level: rejection sampling needs a handful of draws
        chosen = []
        while len(chosen) < count:
            for i in _indices(rng, space, 2 * (count - len(chosen)) + 8):
                if i not in taken and len(chosen) < count:
                    taken.add(i)
                    chosen.append(i)
    taken.update(chosen)
    return chosen


def _indices(rng: np.random.Generator, space: int, n: int) -> list[int]:
    """``n`` uniform draws from ``range(space)``, also where ``space`` exceeds int64 (long chains:
    modchain beyond k = 12, addition beyond k = 9)."""
    if space < 2**63:
        return rng.integers(0, space, size=n).tolist()
    bits = space.bit_length()
    out: list[int] = []
    while len(out) < n:  # rejection keeps it uniform; each draw is accepted with p > 1/2
        i = int.from_bytes(rng.bytes((bits + 7) // 8), "little") & ((1 << bits) - 1)
        if i < space:
            out.append(i)
    return out


class TooFewProblems(ValueError):
    """No difficulty level has enough problems outside the training set to hold out."""


@dataclass(frozen=True)
class HeldOut:
    """Evaluation and probe problems disjoint from a training set (see :func:`held_out_split`)."""

    eval: list[Example]
    probe: list[Example]
    levels: tuple[int, ...]  # difficulties held out: present in eval and probe, unseen in training
    seen: tuple[int, ...]  # difficulties too small to hold out: in neither eval nor probe
    unseen: dict[int, int]  # per difficulty: distinct problems the training set does not hold


def _share(n: int, levels: int) -> int:
    return math.ceil(n / levels)


def held_out_split(
    train: Sequence[Example],
    max_difficulty: int,
    eval_size: int,
    probe_size: int,
    seed: int,
    exclude: Collection[str] = (),
    task: SyntheticTask = MODCHAIN,
) -> HeldOut:
    """``eval_size`` evaluation and ``probe_size`` probe problems, none in ``train`` (nor in
    ``exclude``), none twice, and evaluation and probe sets disjoint, deterministic by seed.

    A level is held out when it has at least ceil(n / L) unseen problems for each of the two
    sets (L = the number of held-out levels); the others are "seen" and left out of both sets,
    whose rows are spread evenly (in random order) over the held-out levels. Raises
    :class:`TooFewProblems` when no level can be held out.
    """
    taken: dict[int, set[int]] = {k: set() for k in range(1, max_difficulty + 1)}
    for prompt in [*(e.prompt for e in train), *exclude]:
        k, index = task.index(prompt)
        if k in taken:
            taken[k].add(index)
    unseen = {k: task.space(k) - len(t) for k, t in taken.items()}
    levels = list(taken)
    while levels:  # fewer levels need more rows each: drop levels until every one left can serve
        need = _share(eval_size, len(levels)) + _share(probe_size, len(levels))
        keep = [k for k in levels if unseen[k] >= need]
        if keep == levels:
            break
        levels = keep
    if not levels:
        raise TooFewProblems(
            f"no difficulty level has enough problems outside the {len(train)} training rows to "
            f"hold out {eval_size} evaluation and {probe_size} probe problems"
        )
    out: dict[str, list[Example]] = {}
    for split, n in (("eval", eval_size), ("probe", probe_size)):
        rng = split_rng(seed, split, 1)  # 1: not a training stream
        ks = balanced_levels(rng, n, levels)
        counts = Counter(int(k) for k in ks)
        drawn = {k: iter(_draw_unseen(rng, task.space(k), k, counts[k], taken[k])) for k in levels}
        out[split] = [task.from_index(int(k), next(drawn[int(k)])) for k in ks]
    seen = tuple(k for k in taken if k not in levels)
    return HeldOut(out["eval"], out["probe"], tuple(levels), seen, unseen)
