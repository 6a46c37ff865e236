"""T2: countdown-mini (after TinyZero's Countdown): combine every given number once with + - * / to hit a target.

Difficulty = how many numbers (2..4), each in 1..max_number. The generator combines the numbers pairwise
in a random order with random operators, keeping only positive integer intermediates (exact division,
no negative differences) and targets <= max_target, so every problem is solvable. The prompt lists the
numbers sorted: `nums 3 7 9 target 30`.

The reasoning shows 0..max_failed random attempts that miss, then the one that hits, `|` between
attempts, one `a op b = c` step each (try-check-retry, the behaviour GRPO can then sharpen):

    nums 3 7 9 target 30    9-3=6 6+7=13|3*7=21 21+9=30    answer 3*7+9

The answer is that attempt's expression with minimal parentheses. `check` accepts any expression of
integer literals and + - * / (parsed with `ast`, no names, no **) whose literals are exactly the given
numbers and whose exact (Fraction) value is the target.
"""

from __future__ import annotations

import ast
import random
from collections import Counter
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar

from nanoseek.data.tasks import Problem, Task

_PREC = {"+": 1, "-": 1, "*": 2, "/": 2}
_AST_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}


def _combine(rng: random.Random, nums: list[int]) -> tuple[int, str, list[str]] | None:
    """One random attempt: (value, expression, steps), or None if an operation left the integers."""
    pool = [(n, str(n), 3) for n in nums]  # (value, expression, precedence; 3 = literal)
    rng.shuffle(pool)
    steps = []
    while len(pool) > 1:
        (va, ea, pa), (vb, eb, pb) = pool.pop(), pool.pop()
        op = rng.choice("+-*/")
        if op == "-" and va <= vb or op == "/" and va % vb:
            (va, ea, pa), (vb, eb, pb) = (vb, eb, pb), (va, ea, pa)  # try the other order first
        if op == "-" and va <= vb or op == "/" and va % vb:
            return None
        v = {"+": va + vb, "-": va - vb, "*": va * vb, "/": va // vb}[op]
        p = _PREC[op]
        left = f"({ea})" if pa < p else ea
        right = f"({eb})" if pb < p or (pb == p and op in "-/") else eb
        steps.append(f"{va}{op}{vb}={v}")
        pool.append((v, f"{left}{op}{right}", p))
        rng.shuffle(pool)
    return pool[0][0], pool[0][1], steps


def evaluate(expr: str) -> tuple[Fraction, list[int]] | None:
    """Exact value and integer literals of an expression of + - * / over int literals; None if not one."""
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return None
    literals: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _AST_OPS:
            a, b, op = ev(node.left), ev(node.right), _AST_OPS[type(node.op)]
            return a + b if op == "+" else a - b if op == "-" else a * b if op == "*" else a / b
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        raise ValueError("not allowed")

    try:
        return ev(tree.body), literals
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


@dataclass(frozen=True)
class Countdown(Task):
    name: str = "countdown"
    max_number: int = 12
    max_target: int = 200
    max_failed: int = 2  # failed attempts shown before the hit

    levels: ClassVar[tuple[int, ...]] = (2, 3, 4)
    weights: ClassVar[tuple[float, ...]] = (0.3, 0.5, 0.2)

    def _generate(self, rng: random.Random, difficulty: int) -> Problem:
        while True:
            nums = sorted(rng.randint(1, self.max_number) for _ in range(difficulty))
            hit = _combine(rng, nums)
            if hit is not None and hit[0] <= self.max_target:
                break
        target, expr, steps = hit
        attempts = []
        for _ in range(rng.randint(0, self.max_failed if difficulty > 2 else 1)):
            for _ in range(20):  # a miss: a valid attempt with another value
                miss = _combine(rng, nums)
                if miss is not None and miss[0] != target:
                    attempts.append(" ".join(miss[2]))
                    break
        attempts.append(" ".join(steps))
        prompt = f"nums {' '.join(map(str, nums))} target {target}"
        return Problem(prompt, "|".join(attempts), expr, self.name, difficulty, {"nums": nums, "target": target})

    def canonical(self, answer: str) -> str | None:
        """An integer as for every task, else an allowed expression without its spaces."""
        s = answer.strip()
        expression = len(s) <= 100 and evaluate(s) is not None
        return super().canonical(s) or ("".join(s.split()) if expression else None)

    def check(self, problem: Problem, answer: str) -> bool:
        if len(answer) > 100:
            return False
        got = evaluate(answer)
        return (got is not None and got[0] == problem.meta["target"]
                and Counter(got[1]) == Counter(problem.meta["nums"]))
