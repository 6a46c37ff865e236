"""T1: multi-digit addition / subtraction with a carry (borrow) scratchpad (the demo default).

Difficulty = digits per operand (1..5; level 1 uses 0..9). Both operands have the same number of digits;
for subtraction the larger comes first, so results are >= 0. One step per digit, least significant first:

    add  347+586=   7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0          -> 933
         x+y[+1]=s c(s // 10)      (+1 only when a carry comes in; a final carry becomes the leading 1)
    sub  503-278=   13-8=5 b1|10-7-1=2 b1|5-2-1=2 b0          -> 225
         (x + 10 b)-y[-1]=d b(b)   (b = 1 when the digit must borrow; -1 only when a borrow comes in)

The answer is the steps' last digits read backwards, leading zeros dropped.
p_err (imitation noise, default 0): each step's written result is off by one with probability p_err; the
written carries and answer follow the wrong step, `Problem.answer` stays true. A problem's prompt does
not depend on p_err (the noise has its own generator, drawn from the problem's).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from nanoseek.data.tasks import Problem, Task


def _digits(n: int, width: int) -> list[int]:
    return [(n // 10**i) % 10 for i in range(width)]  # least significant first


def _off_by_one(v: int, lo: int, hi: int, rng: random.Random) -> int:
    w = v + rng.choice((-1, 1))
    return w if lo <= w <= hi else 2 * v - w


def add_steps(a: int, b: int, noise: random.Random | None = None, p_err: float = 0.0) -> tuple[list[str], int]:
    """Scratchpad steps of a + b (a, b >= 0) and the result they arrive at."""
    width = max(len(str(a)), len(str(b)))
    steps, out, c = [], [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        s = x + y + c
        if noise is not None and p_err > 0 and noise.random() < p_err:
            s = _off_by_one(s, 0, 19 if c else 18, noise)
        steps.append(f"{x}+{y}{'+1' if c else ''}={s} c{s // 10}")
        out.append(s % 10)
        c = s // 10
    result = int("".join(map(str, reversed(out))))
    return steps, result + c * 10**width


def sub_steps(a: int, b: int, noise: random.Random | None = None, p_err: float = 0.0) -> tuple[list[str], int]:
    """Scratchpad steps of a - b (a >= b >= 0) and the result they arrive at."""
    if a < b:
        raise ValueError(f"sub_steps needs a >= b, got {a} - {b}")
    width = len(str(a))
    steps, out, borrow = [], [], 0
    for x, y in zip(_digits(a, width), _digits(b, width)):
        d = x - y - borrow
        new_borrow = int(d < 0)
        d += 10 * new_borrow
        if noise is not None and p_err > 0 and noise.random() < p_err:
            d = _off_by_one(d, 0, 9, noise)
        steps.append(f"{x + 10 * new_borrow}-{y}{'-1' if borrow else ''}={d} b{new_borrow}")
        out.append(d)
        borrow = new_borrow
    return steps, int("".join(map(str, reversed(out))))


@dataclass(frozen=True)
class Arithmetic(Task):
    name: str = "add"
    op: str = "+"  # "+" or "-"
    p_err: float = 0.0  # imitation noise per digit step (see the module docstring)

    levels: ClassVar[tuple[int, ...]] = (1, 2, 3, 4, 5)
    weights: ClassVar[tuple[float, ...]] = (0.1, 0.3, 0.35, 0.2, 0.05)

    def __post_init__(self):
        if self.op not in ("+", "-"):
            raise ValueError(f"{self.name}: op={self.op!r} must be '+' or '-'")
        if not 0 <= self.p_err <= 1:
            raise ValueError(f"{self.name}: p_err={self.p_err} must be in [0, 1]")

    def _generate(self, rng: random.Random, difficulty: int) -> Problem:
        lo, hi = (0, 9) if difficulty == 1 else (10 ** (difficulty - 1), 10**difficulty - 1)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        noise = random.Random(rng.getrandbits(64))  # drawn always, so prompts do not depend on p_err
        if self.op == "-":
            a, b = max(a, b), min(a, b)
            steps, written = sub_steps(a, b, noise, self.p_err)
            answer = a - b
        else:
            steps, written = add_steps(a, b, noise, self.p_err)
            answer = a + b
        return Problem(f"{a}{self.op}{b}=", "|".join(steps), str(answer), self.name, difficulty,
                       {"a": a, "b": b, "op": self.op}, None if written == answer else str(written))
