"""The embedded synthetic reasoning task: chained modular arithmetic with a chain of thought.

An example of difficulty k applies k operations to a start digit, modulo 10::

    prompt  "7+3*2-4?"                      (start digit, then k (op, digit) pairs, then '?')
    target  "7+3=0;0*2=0;0-4=6;#6"          (one CoT step per operation, then '#answer')

Each step must find the i-th operation in the prompt (a positional look-up that needs attention
over a distance that grows with k) and apply a 10x10 table for that operator. One step error
ruins the answer, so accuracy falls roughly like p**k with per-step accuracy p, and p grows with
model capacity: harder items need more capacity, which gives the teacher ladder its gradient.
The CoT step count k is the CoT-derived difficulty (1..max_difficulty). Generation is
deterministic by seed; train and held-out sets are drawn from disjoint seed streams.
"""

from __future__ import annotations

import numpy as np

from clpd_ray.data.example import Example

__all__ = ["OPERATORS", "TASK_ALPHABET", "generate_examples", "make_example", "solve"]

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
    if split not in ("train", "eval", "probe"):
        raise ValueError(f"split must be 'train', 'eval' or 'probe', got {split!r}")
    stream = {"train": 0, "eval": 1, "probe": 2}[split]
    rng = np.random.default_rng([seed, stream])
    ks = np.arange(n) % max_difficulty + 1  # balanced difficulties
    rng.shuffle(ks)
    out = []
    for k in ks:
        start = int(rng.integers(0, _MOD))
        ops = [
            (OPERATORS[int(rng.integers(0, len(OPERATORS)))], int(rng.integers(0, _MOD)))
            for _ in range(int(k))
        ]
        out.append(make_example(start, ops))
    return out
