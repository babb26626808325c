"""The second embedded task: multi-digit addition with the carries written as a chain of thought.

An example of difficulty k adds two k-digit numbers (leading zeros allowed), one column per
CoT step from the right, each step the two digits, the carry in, and the column sum::

    prompt  "357+468?"
    target  "7+8+0=15;5+6+1=12;3+4+1=8;#825"

Its structure differs from the chained arithmetic of :mod:`clpd_ray.data.task`: every step reads
two digits at mirrored positions of the prompt (not the next operator in order), the state
passed between steps is one carry bit (not the whole running value), and the answer is not the
last step's result but is assembled from every step's units digit and the last carry, so one
wrong column anywhere spoils it. The floor (the best constant answer) is about 1% at k >= 2,
against 17% for the chained task. Difficulty k = CoT steps = digits, 1..max_difficulty; level k
has ``100**k`` problems (100 at k=1, all of them in a 20,000-row training set). Generation is
deterministic by seed, with one stream per split.
"""

from __future__ import annotations

from clpd_ray.data.example import Example
from clpd_ray.data.synthetic import SyntheticTask, balanced_levels, split_rng

__all__ = ["ADDITION", "add_columns", "generate_examples", "make_example", "problem_index"]

_STREAM_TAG = 11  # keeps these streams apart from the chained task's at the same seed


def add_columns(a: str, b: str) -> tuple[str, int]:
    """The chain of thought and sum of two digit strings of one length, columns from the right."""
    if len(a) != len(b) or not (a + b).isdigit():
        raise ValueError(f"need two digit strings of one length, got {a!r} and {b!r}")
    steps, carry = [], 0
    for x, y in zip(reversed(a), reversed(b), strict=True):
        total = int(x) + int(y) + carry
        steps.append(f"{x}+{y}+{carry}={total};")
        carry = total // 10
    return "".join(steps), int(a) + int(b)


def make_example(a: str, b: str) -> Example:
    cot, total = add_columns(a, b)
    return Example(prompt=f"{a}+{b}?", target=f"{cot}#{total}", answer=str(total), steps=len(a))


def generate_examples(
    n: int, max_difficulty: int, seed: int, split: str = "train"
) -> list[Example]:
    """``n`` examples with difficulty balanced over 1..max_difficulty, deterministic by seed."""
    rng = split_rng(seed, split, _STREAM_TAG)
    ks = balanced_levels(rng, n, range(1, max_difficulty + 1))
    out = []
    for k in ks:
        digits = "".join(str(d) for d in rng.integers(0, 10, size=2 * int(k)))
        out.append(make_example(digits[: int(k)], digits[int(k) :]))
    return out


def problem_space(k: int) -> int:
    """The number of distinct problems of difficulty ``k``: two k-digit numbers."""
    return 100**k


def problem_index(prompt: str) -> tuple[int, int]:
    """(difficulty k, index) of a prompt like "357+468?": the index is the two numbers, a then b,
    read as one 2k-digit number (the inverse of :func:`_from_index`)."""
    a, plus, b = prompt.removesuffix("?").partition("+")
    if not plus or not a or len(a) != len(b) or not (a + b).isdigit() or not prompt.endswith("?"):
        raise ValueError(f"{prompt!r} is not an addition prompt such as '357+468?'")
    return len(a), int(a + b)


def _from_index(k: int, index: int) -> Example:
    digits = f"{index:0{2 * k}d}"
    return make_example(digits[:k], digits[k:])


ADDITION = SyntheticTask(
    name="addition",
    generate=generate_examples,
    space=problem_space,
    index=problem_index,
    from_index=_from_index,
)
