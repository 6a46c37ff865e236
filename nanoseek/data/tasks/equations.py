"""T3: one-variable linear equations with an integer solution.

    level 1  ax+b=c,      a in 2..9, b in 1..30, x in 0..20        3x+5=26       26-5=21|21/3=7
    level 2  ax+b=c,      a in +-(2..9), b in +-(1..30), x in -20..20
                                                                   -4x-7=33      33+7=40|40/-4=-10
    level 3  ax+b=dx+e,   a != d in 2..9, b in +-(1..30), x in -20..20, e = (a-d)x+b (0 is omitted)
                                                                   5x+3=2x+18    5x-2x=3x|18-3=15|15/3=5
The answer is x. Steps: collect x on the left, move the constant right, divide.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from nanoseek.data.tasks import Problem, Task


def _const(v: int) -> str:
    """A constant term after another term: +5, -5, or nothing for 0."""
    return f"{v:+d}" if v else ""


def _move(c: int, b: int) -> str:
    """The step c - b written without a double sign: 26-5=21, 33+7=40."""
    return f"{c}-{b}={c - b}" if b >= 0 else f"{c}+{-b}={c - b}"


@dataclass(frozen=True)
class LinearEquation(Task):
    name: str = "linear"

    levels: ClassVar[tuple[int, ...]] = (1, 2, 3)
    weights: ClassVar[tuple[float, ...]] = (0.45, 0.35, 0.2)

    def _generate(self, rng: random.Random, difficulty: int) -> Problem:
        if difficulty == 1:
            a, b, x = rng.randint(2, 9), rng.randint(1, 30), rng.randint(0, 20)
        else:
            a = rng.randint(2, 9) * (rng.choice((-1, 1)) if difficulty == 2 else 1)
            b = rng.randint(1, 30) * rng.choice((-1, 1))
            x = rng.randint(-20, 20)
        if difficulty < 3:
            c = a * x + b
            prompt = f"{a}x{_const(b)}={c}"
            steps = [_move(c, b), f"{c - b}/{a}={x}"]
            meta = {"a": a, "b": b, "c": c}
        else:
            d = rng.choice([v for v in range(2, 10) if v != a])
            e = (a - d) * x + b
            prompt = f"{a}x{_const(b)}={d}x{_const(e)}"
            steps = [f"{a}x-{d}x={a - d}x", _move(e, b), f"{e - b}/{a - d}={x}"]
            meta = {"a": a, "b": b, "d": d, "e": e}
        return Problem(prompt, "|".join(steps), str(x), self.name, difficulty, meta)
