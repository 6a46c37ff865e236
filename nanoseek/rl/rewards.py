"""Rule-based rewards (R1 paper §2.2.2): accuracy, format, and user reward functions.

A completion is the decoded assistant text after the prompt, end-of-text stripped, with the think block the
prompt opened put back in front (`Prompt.opener`, rl/evaluate.py: R1's template ends with `<think>\\n`), e.g.
`<think>7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0</think><answer>933</answer>`.

    format    1 iff well-formed: optional leading whitespace, exactly one <think>...</think>, then only
              whitespace, exactly one non-empty <answer>...</answer>, then only whitespace (Logic-RL style:
              each of the four tags exactly once, in order).
    accuracy  1 iff the answer passes the task's checker. The answer is the stripped content of the one
              <answer> block after the reasoning (the text after </think>, or the whole text when there are
              no think tags). None, so no credit, when there is no such block, more than one <answer> tag
              anywhere, an answer only inside <think>, or broken think tags (repeated, nested, unclosed,
              out of order).
    other extractors (per problem, `problem.extractor`: boxed, gsm8k, a user "module:function"; answers.py)
              read the answer from the text after the one <think>...</think> (the whole text when there are
              no think tags; None for broken think tags), so the reasoning is never searched; format is 1
              iff that reasoning block is there, closed, and an answer follows it (R1: "within a box").
    total     sum_i w_i r_i. R1 adds accuracy and format with the same weight (R1 in Nature, eq. 4); the default here
              is TinyZero's accuracy 1.0, format 0.1, so format cannot dominate.

Checkers: a built-in family uses its own `Task.check` (integers of <= 12 ASCII digits; countdown: an `ast`
parse of + - * / over the given numbers). A JSONL user task (`problem.task` = "jsonl:<stem>") is free-form:
the exact / numeric comparison of `JsonlTask.check`, then math-verify (open-r1's accuracy reward): gold and
answer each parsed as one LaTeX expression (wrapped in \\boxed{}, so "2 or 0.5" is a set, not 0.5) and
compared with `verify`. Unlike open-r1, an unparseable gold falls back to the exact check instead of
skipping the example; a gold with words ("Paris") never goes to sympy, where "Pairs" = P*a*i*r*s would match.

Gaming guards: answers over MAX_ANSWER_CHARS get no credit before any parse; sympy only sees answers of
<= MAX_MATH_CHARS ASCII-digit characters with digit runs <= MAX_DIGITS, balanced braces, no factorial,
sum, product, integral or limit, and no nested or huge exponents (10^{10^{10}} would hang in C, where no
timeout reaches). math-verify's own timeouts use SIGALRM, so they are on (MATH_TIMEOUT_S) in the main
thread only; in other threads the guards above are the bound. Non-ASCII digits ("٩٣٣", "９３３") get no
credit anywhere.
"""

from __future__ import annotations

import difflib
import math
import numbers
import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from nanoseek.data.tasks import TASKS, Problem, Task, parse_number
from nanoseek.data.tasks.answers import ANSWER_TAG, load_function, reader
from nanoseek.data.chat_template import END_THINK, EOS, THINK

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
DEFAULT_WEIGHTS = {"accuracy": 1.0, "format": 0.1}
MAX_ANSWER_CHARS = 512  # longer answers get no accuracy credit (and never reach a parser)
MAX_MATH_CHARS = 200  # free-form answers that sympy may see
MAX_DIGITS = 30  # the longest digit run sympy may see
MAX_EXPONENT_DIGITS = 4  # x^{1234} is fine, 9^{99999999} is not
MATH_TIMEOUT_S = 2  # math-verify parse / verify timeouts (whole seconds: SIGALRM), main thread only

_ANSWER_BLOCK = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ----------------------------------------------------------------------------- parsing
@dataclass(frozen=True)
class Parsed:
    reasoning: str | None  # the text inside the one <think>...</think>, None when absent or broken
    answer: str | None  # the stripped content of the one <answer> block after the reasoning; None: no credit
    well_formed: bool


def parse_completion(text: str, extractor: str = ANSWER_TAG) -> Parsed:
    """Split a completion into reasoning and answer, the answer read by `extractor` (the module docstring)."""
    body = text.rstrip()
    if body.endswith(EOS):  # tolerated: callers that decode the stop token too
        body = body[: -len(EOS)]
    n_open, n_close = body.count(THINK), body.count(END_THINK)
    reasoning, after = None, None
    if n_open == n_close == 1 and body.index(THINK) < body.index(END_THINK):
        start, end = body.index(THINK) + len(THINK), body.index(END_THINK)
        reasoning, after = body[start:end], body[end + len(END_THINK):]
    elif n_open == n_close == 0:
        after = body
    if extractor != ANSWER_TAG:
        answer = reader(extractor)(after) if after is not None else None
        answer = (answer.strip() or None) if answer is not None else None
        return Parsed(reasoning, answer, reasoning is not None and answer is not None)
    answer = None
    if after is not None and body.count(ANSWER_OPEN) == 1 and body.count(ANSWER_CLOSE) == 1:
        m = _ANSWER_BLOCK.search(after)
        answer = (m.group(1).strip() or None) if m else None
    well_formed = (reasoning is not None and answer is not None and body[: body.index(THINK)].strip() == ""
                   and re.fullmatch(r"\s*<answer>.*</answer>\s*", after, re.DOTALL) is not None)
    return Parsed(reasoning, answer, well_formed)


# ----------------------------------------------------------------------------- checkers
def resolve_task(problem: Problem, tasks: dict[str, Task] | None = None) -> Task | None:
    """The task that checks `problem`: from `tasks` (by name), else the registry; None for a JSONL task that
    was not passed (its check is generic: free-form). An unknown name is an error."""
    if tasks and problem.task in tasks:
        return tasks[problem.task]
    if problem.task in TASKS:
        return TASKS[problem.task]
    if problem.task.startswith("jsonl:"):
        return None
    raise ValueError(f"no checker for task {problem.task!r}: pass its Task (tasks=[...]); registered: {sorted(TASKS)}")


def _non_ascii_digit(s: str) -> bool:
    return any(c.isdigit() and not c.isascii() for c in s)


def _balanced(s: str) -> bool:
    depth = 0
    for c in s.replace(r"\{", "").replace(r"\}", ""):
        depth += (c == "{") - (c == "}")
        if depth < 0:
            return False
    return depth == 0


def _exponents_ok(s: str) -> bool:
    """No power inside or right after an exponent, and exponents of at most MAX_EXPONENT_DIGITS digits."""
    for m in re.finditer(r"\^|\*\*", s):
        rest = s[m.end():].lstrip()
        if rest[:1] and rest[0] in "{(":
            close, depth, i = "}" if rest[0] == "{" else ")", 0, 0
            for i, c in enumerate(rest):
                depth += (c == rest[0]) - (c == close)
                if depth == 0:
                    break
            operand, tail = rest[: i + 1], rest[i + 1:]
        else:
            op = re.match(r"-?(\\[A-Za-z]+|[\w.]*)", rest)
            operand, tail = op.group(0), rest[op.end():]
        if re.search(r"\^|\*\*", operand) or re.match(r"\s*(\^|\*\*)", tail):
            return False
        if any(len(d) > MAX_EXPONENT_DIGITS for d in re.findall(r"\d+", operand)):
            return False
    return True


def math_safe(s: str) -> bool:
    """Whether sympy may parse s without risk of hanging (the guards of the module docstring)."""
    return (len(s) <= MAX_MATH_CHARS and not _non_ascii_digit(s) and _balanced(s)
            and not any(len(d) > MAX_DIGITS for d in re.findall(r"\d+", s))
            and "!" not in s.replace(r"\!", "")
            and not re.search(r"\\(sum|prod|int|oint|iint|lim)(?![A-Za-z])", s) and _exponents_ok(s))


def _looks_like_words(s: str) -> bool:
    """A run of two letters outside LaTeX commands and \\text{...}: a word, not math."""
    s = re.sub(r"\\(text|mathrm|textbf|mbox)\{[^{}]*\}", " ", s)
    return re.search(r"[A-Za-z]{2,}", re.sub(r"\\[A-Za-z]+", " ", s)) is not None


@lru_cache(maxsize=8192)
def _math_parse(s: str, timeout: int | None) -> tuple:
    from math_verify import LatexExtractionConfig, parse

    return tuple(parse("\\boxed{" + s + "}", extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
                       parsing_timeout=timeout))


def math_equal(answer: str, gold: str) -> bool:
    """math-verify equivalence of two LaTeX / plain expressions (`\\frac{1}{2}` == `0.5`), bounded."""
    if not (math_safe(answer) and math_safe(gold)) or _looks_like_words(gold):
        return False
    from math_verify import verify

    timeout = MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    g, a = _math_parse(gold.strip(), timeout), _math_parse(answer.strip(), timeout)
    if not g or not a:
        return False
    try:
        return bool(verify(list(g), list(a), timeout_seconds=timeout))
    except Exception:  # math-verify's own errors (it raises on odd inputs): no credit
        return False


def free_form_equal(answer: str, gold: str) -> bool:
    """Exact string, then number (so "42" == "42.0" and "1/2" == "0.5"), then math-verify."""
    if answer.strip() == gold.strip():
        return True
    a, b = parse_number(answer, 2 * MAX_DIGITS), parse_number(gold, 2 * MAX_DIGITS)
    if a is not None and b is not None:
        return a == b
    return math_equal(answer, gold)


def answer_correct(problem: Problem, answer: str | None, task: Task | None = None) -> bool:
    """Whether an extracted answer is right; `task` None: `resolve_task(problem)`."""
    if answer is None or len(answer) > MAX_ANSWER_CHARS or _non_ascii_digit(answer):
        return False
    task = task if task is not None else resolve_task(problem)
    if task is None:
        return free_form_equal(answer, problem.answer)
    if task.free_form:
        return task.check(problem, answer) or math_equal(answer, problem.answer)
    return bool(task.check(problem, answer))


def accuracy_reward(problem: Problem, text: str, task: Task | None = None) -> float:
    """1.0 iff the completion's answer (read by problem.extractor) passes the checker (task None: the registry,
    or free-form for JSONL)."""
    return float(answer_correct(problem, parse_completion(text, problem.extractor).answer, task))


def format_reward(text: str, extractor: str = ANSWER_TAG) -> float:
    """1.0 iff the completion is well-formed: `<think>...</think><answer>...</answer>`, nothing around (answer_tag);
    a closed reasoning block and an answer after it (other extractors)."""
    return float(parse_completion(text, extractor).well_formed)


# ----------------------------------------------------------------------------- user reward functions
def load_reward_fn(spec: str) -> Callable[[Problem, str], float]:
    """Import a user reward `fn(problem, text) -> float` from "package.module:function" or
    "path/to/file.py:function". The returned callable checks that each result is a finite number."""
    return checked(load_function(spec, "reward function"), spec.strip())


def checked(fn: Callable, label: str) -> Callable[[Problem, str], float]:
    """Wrap a reward so that a result that is not a finite number raises a ValueError naming it."""
    def reward(problem: Problem, text: str) -> float:
        r = fn(problem, text)
        if not isinstance(r, numbers.Real) or not math.isfinite(float(r)):
            raise ValueError(f"reward function {label} returned {r!r} ({type(r).__name__}) for prompt "
                             f"{problem.prompt[:60]!r}; a reward must be a finite number")
        return float(r)

    reward.__name__ = getattr(fn, "__name__", label)
    return reward


# ----------------------------------------------------------------------------- the combined reward
class Rewards:
    """reward(problem, text) -> {"total", "accuracy", "format", <user names>...}; total = sum_i w_i r_i.

    weights: per reward name (default accuracy 1.0, format 0.1; user functions 1.0); a name that is not a
    reward is an error. user_fns: "module:function" / "file.py:function" specs or callables, each named by
    its function name. tasks: Task objects for problems whose task is not registered (JSONL user tasks).
    """

    def __init__(self, weights: dict[str, float] | None = None, user_fns: Sequence[str | Callable] = (),
                 tasks: Iterable[Task] = ()):
        self.tasks = {t.name: t for t in tasks}
        self.user = {}
        for f in user_fns:
            fn = load_reward_fn(f) if isinstance(f, str) else checked(f, getattr(f, "__name__", repr(f)))
            if fn.__name__ in ("total", "accuracy", "format", *self.user):
                raise ValueError(f"reward function {f!r}: the name {fn.__name__!r} is taken; rename the function")
            self.user[fn.__name__] = fn
        self.weights = {"accuracy": DEFAULT_WEIGHTS["accuracy"], "format": DEFAULT_WEIGHTS["format"],
                        **{name: 1.0 for name in self.user}}
        for name, w in (weights or {}).items():
            if name not in self.weights:
                near = difflib.get_close_matches(name, self.weights, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"reward weight {name!r}: no such reward{hint}; rewards: {self.names}")
            if not isinstance(w, numbers.Real) or not math.isfinite(w):
                raise ValueError(f"reward weight {name}={w!r} must be a finite number")
            self.weights[name] = float(w)

    @property
    def names(self) -> list[str]:
        """The reward names, in the order of the result dict (after "total")."""
        return list(self.weights)

    def __call__(self, problem: Problem, text: str) -> dict[str, float]:
        parsed = parse_completion(text, problem.extractor)
        task = resolve_task(problem, self.tasks)
        out = {"accuracy": float(answer_correct(problem, parsed.answer, task)), "format": float(parsed.well_formed)}
        for name, fn in self.user.items():
            out[name] = fn(problem, text)
        return {"total": sum(self.weights[k] * v for k, v in out.items()), **out}

    def __repr__(self) -> str:
        return f"Rewards(weights={self.weights})"
