"""T4: short word problems: templated sentences around addition and subtraction.

    level 1  one operation, numbers 1..9        level 2  one operation, numbers 10..99
    level 3  two operations (add then take away), numbers 10..99

The reasoning restates each operation, then works it with the add / sub scratchpad of `arithmetic`:

    Mia has 23 pens and gets 15 more. How many pens does Mia have?
    23+15|3+5=8 c0|2+1=3 c0                                           -> 38

so the family shares its digit skills with T1 and adds reading the numbers out of text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from nanoseek.data.tasks import Problem, Task
from nanoseek.data.tasks.arithmetic import add_steps, sub_steps

NAMES = ("Ann", "Ben", "Mia", "Sam", "Li", "Omar", "Zoe", "Tom", "Ava", "Raj")
ITEMS = ("apples", "books", "coins", "cards", "eggs", "pens", "stamps", "shells", "cups", "keys")
ADD = ("{n} has {a} {i} and gets {b} more. How many {i} does {n} have?",
       "There are {a} {i} in a box and {b} in a bag. How many {i} in all?",
       "{n} had {a} {i}. A friend gave {n} {b} more. How many {i} now?")
SUB = ("{n} has {a} {i} and gives away {b}. How many {i} are left?",
       "A box holds {a} {i}. {n} takes out {b}. How many {i} are in the box?",
       "{n} had {a} {i} and lost {b}. How many {i} does {n} have now?")
TWO = ("{n} has {a} {i}, gets {b} more and gives away {c}. How many {i} are left?",
       "A box holds {a} {i}. {n} adds {b} and takes out {c}. How many {i} are in the box?")


@dataclass(frozen=True)
class WordProblem(Task):
    name: str = "word"

    levels: ClassVar[tuple[int, ...]] = (1, 2, 3)
    weights: ClassVar[tuple[float, ...]] = (0.3, 0.45, 0.25)

    def _generate(self, rng: random.Random, difficulty: int) -> Problem:
        lo, hi = (1, 9) if difficulty == 1 else (10, 99)
        n, i = rng.choice(NAMES), rng.choice(ITEMS)
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if difficulty == 3:
            c = rng.randint(lo, min(hi, a + b))
            s1, total = add_steps(a, b)
            s2, answer = sub_steps(total, c)
            prompt = rng.choice(TWO).format(n=n, a=a, b=b, c=c, i=i)
            steps = [f"{a}+{b}", *s1, f"{total}-{c}", *s2]
            meta = {"a": a, "b": b, "c": c}
        elif rng.random() < 0.5:
            steps, answer = add_steps(a, b)
            prompt = rng.choice(ADD).format(n=n, a=a, b=b, i=i)
            steps = [f"{a}+{b}", *steps]
            meta = {"a": a, "b": b, "op": "+"}
        else:
            a, b = max(a, b), min(a, b)
            steps, answer = sub_steps(a, b)
            prompt = rng.choice(SUB).format(n=n, a=a, b=b, i=i)
            steps = [f"{a}-{b}", *steps]
            meta = {"a": a, "b": b, "op": "-"}
        return Problem(prompt, "|".join(steps), str(answer), self.name, difficulty, meta)
