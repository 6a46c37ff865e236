"""Verifiable tasks: generated problem families (this project's, after TinyZero's) and user tasks from JSONL.

Document format (the chat format of `nanoseek.data.tokenizer`, one problem per document; in the token
stream each document is framed by <|begin_of_text|> ... <|end_of_text|>, which the shard writer adds):

    <|user|>{prompt}<|assistant|><think>{reasoning}</think><answer>{answer}</answer>

    add        <|user|>347+586=<|assistant|><think>7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0</think><answer>933</answer>
    sub        <|user|>503-278=<|assistant|><think>13-8=5 b1|10-7-1=2 b1|5-2-1=2 b0</think><answer>225</answer>
    countdown  <|user|>nums 3 7 9 target 30<|assistant|><think>9-3=6 6+7=13|3*7=21 21+9=30</think><answer>3*7+9</answer>
    linear     <|user|>3x+5=26<|assistant|><think>26-5=21|21/3=7</think><answer>7</answer>
    word       <|user|>Mia has 23 pens and gets 15 more. How many pens does Mia have?<|assistant|>
               <think>23+15|3+5=8 c0|2+1=3 c0</think><answer>38</answer>

Scratchpads go least-significant digit first, one `|`-separated step per digit (c = carry, b = borrow).
Every answer is canonical and checker-friendly: an integer for add / sub / linear / word, and for
countdown an expression (any expression that uses each number once and evaluates to the target is
right; `problem.meta` holds nums and target). `task.check(problem, answer)` is the exact-answer
predicate on an already extracted answer string; parsing completions and scoring them is the rewards'
job (rl/rewards.py).

Templates and answer formats (R1 paper §2.2.3; the DeepSeek-R1 README's usage notes), per task (options
`template`, `extractor`; every problem carries its task's): the template poses the prompt, `chat` (the model's
chat template, user turn = prompt), `boxed` (chat, with R1's and DeepSeekMath's "Please reason step by step, and
put your final answer within \\boxed{}." on a line after the prompt), `r1-zero` (R1-Zero's raw-text template, R1
paper Table 1, for base models) or any string with `{prompt}` (raw text); the extractor reads the answer,
`answer_tag` (R1-Zero's <answer>...</answer>), `boxed`, `gsm8k` or a user "module:function" (answers.py).
Built-in families default to chat + answer_tag, the format they are trained on. Options go in the task name too:
"add?template=r1-zero", "gsm8k.jsonl?extractor=boxed&template=boxed" (values URL-quoted: %26 for &, %2C for a
comma).

Held-out split: a prompt is held out iff int(sha1(prompt)) % 10 == 0. It depends on the
prompt string only, so it is stable across runs, seeds and difficulty mixes; training data is drawn from
the "train" split only and evaluation from "heldout".

Imitation noise (the demo's design, docs/LOG.md), add and sub only: with p_err > 0 each digit step of the
written trace is off by one with probability p_err, and the written answer follows the (wrong) trace, while
`problem.answer` stays the true answer. Default 0: the built-in corpus is noise-free unless asked.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import ClassVar
from urllib.parse import unquote

from nanoseek.data.tasks.answers import ANSWER_TAG, check_extractor
from nanoseek.data.chat_template import ASSISTANT, END_THINK, THINK, USER

SPLITS = ("train", "heldout")
HELDOUT_MOD = 10


def split_of(prompt: str) -> str:
    """'heldout' iff int(sha1(prompt)) % 10 == 0, else 'train'."""
    h = int.from_bytes(hashlib.sha1(prompt.encode("utf-8")).digest(), "big")
    return "heldout" if h % HELDOUT_MOD == 0 else "train"


def make_rng(*parts) -> random.Random:
    """A random.Random seeded from the parts' string forms via sha256 (stable across runs and platforms)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


@dataclass(frozen=True)
class Problem:
    prompt: str
    reasoning: str
    answer: str  # the true, canonical answer
    task: str
    difficulty: int
    meta: dict = field(default_factory=dict, compare=False)  # what a checker needs beyond the answer
    written_answer: str | None = None  # the answer a noisy trace arrives at, when it differs (p_err)
    template: str = "chat"  # how the prompt is posed (TEMPLATES, or a string with {prompt})
    extractor: str = ANSWER_TAG  # how the final answer is read (answers.py)

    @property
    def completion(self) -> str:
        """What the assistant writes: `<think>{reasoning}</think><answer>{answer}</answer>`."""
        shown = self.answer if self.written_answer is None else self.written_answer
        return f"{THINK}{self.reasoning}{END_THINK}<answer>{shown}</answer>"

    @property
    def document(self) -> str:
        """The training text (no trailing eos: the shard writer appends it)."""
        return f"{USER}{self.prompt}{ASSISTANT}{self.completion}"

    @property
    def split(self) -> str:
        return split_of(self.prompt)

    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.completion}]

    def posed(self) -> list[dict] | str:
        """The prompt as its template poses it: the user turn for the model's chat template (`chat`, `boxed`),
        or raw text (`r1-zero`, a custom string; {prompt} replaced, so other braces stay as written)."""
        if self.template in ("chat", "boxed"):
            extra = f"\n{BOXED_INSTRUCTION}" if self.template == "boxed" else ""
            return [{"role": "user", "content": self.prompt + extra}]
        return TEMPLATES.get(self.template, self.template).replace("{prompt}", self.prompt)


R1_ZERO = ("A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The "
           "assistant first thinks about the reasoning process in the mind and then provides the user with the "
           "answer. The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> "
           "tags, respectively, i.e., <think> reasoning process here </think> <answer> answer here </answer>. "
           "User: {prompt}. Assistant:")  # R1 paper Table 1, verbatim
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = {"chat": None, "boxed": None, "r1-zero": R1_ZERO}  # name -> raw text (None: the chat template)


def check_template(template: str) -> str:
    """template, once it names a template or is a string with {prompt}."""
    if template not in TEMPLATES and "{prompt}" not in template:
        near = difflib.get_close_matches(template, TEMPLATES, n=1)
        raise ValueError(f"template {template!r}: not one of {list(TEMPLATES)}"
                         f"{f' (did you mean {near[0]!r}?)' if near else ''} nor a string with {{prompt}}")
    return template


def parse_number(s: str, max_chars: int = 60) -> Fraction | None:
    """A plain ASCII number ("7", "-0.50", "3/4", "1e3") as an exact Fraction; None for anything else or for more
    than max_chars characters (so no huge literal is ever parsed). The one number parser of checks, rewards
    and votes."""
    s = s.strip()
    if len(s) > max_chars or not s.isascii():
        return None
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


_INT = re.compile(r"-?[0-9]{1,12}")
_DECIMAL_OR_FRACTION = re.compile(r"-?[0-9]*\.?[0-9]+(/[0-9]+)?")


def free_form_canonical(answer: str) -> str:
    """A free-form answer as it votes: a decimal or fraction as a reduced fraction ("0.50" -> "1/2"), an integer
    as itself, anything else whitespace-normalized."""
    s = answer.strip()
    n = parse_number(s) if _DECIMAL_OR_FRACTION.fullmatch(s) else None
    if n is not None:
        return str(n.numerator) if n.denominator == 1 else f"{n.numerator}/{n.denominator}"
    return " ".join(s.split())


def int_answer_equal(answer: str, expected: str) -> bool:
    """True iff answer (stripped) is an integer of at most 12 digits equal to expected."""
    s = answer.strip()
    body = s[1:] if s.startswith("-") else s
    return body.isdigit() and len(body) <= 12 and body.isascii() and int(s) == int(expected)


class Task:
    """A family of generated problems. Subclasses set name, levels, weights and implement `_generate`."""

    name: str
    levels: ClassVar[tuple[int, ...]]  # allowed difficulties
    weights: ClassVar[tuple[float, ...]]  # default mix over levels when difficulty is None
    template: str = "chat"  # stamped on every problem (`pose`); set with with_options
    extractor: str = ANSWER_TAG

    def _generate(self, rng: random.Random, difficulty: int) -> Problem:
        raise NotImplementedError

    def generate(self, rng: random.Random | int, difficulty: int) -> Problem:
        """One problem of the given difficulty from rng (or an int seed)."""
        if difficulty not in self.levels:
            raise ValueError(f"{self.name}: difficulty={difficulty!r} is not one of {self.levels}")
        return self.pose(self._generate(rng if isinstance(rng, random.Random) else random.Random(rng), difficulty))

    def pose(self, problem: Problem) -> Problem:
        """The problem with this task's template and extractor."""
        if (problem.template, problem.extractor) == (self.template, self.extractor):
            return problem
        return dataclasses.replace(problem, template=self.template, extractor=self.extractor)

    free_form: ClassVar[bool] = False  # answers are free text (JSONL tasks): math-verify may also accept them

    def check(self, problem: Problem, answer: str) -> bool:
        """Exact-answer predicate on an extracted answer string."""
        return int_answer_equal(answer, problem.answer)

    def canonical(self, answer: str) -> str | None:
        """The answer as it votes in maj@k (equal canonical forms are one answer), None when it does not parse
        for this task: here (integer tasks) "-?digits" -> str(int) ("007" -> "7")."""
        s = answer.strip()
        return str(int(s)) if _INT.fullmatch(s) else None

    split_of = staticmethod(split_of)

    def size(self, split: str) -> int | None:
        """How many distinct problems the split holds; None: unbounded (generated)."""
        return None

    def sample(self, n: int, split: str = "train", seed: int = 0, difficulty: int | None = None,
               unique: bool = False) -> list[Problem]:
        """n problems of `split` (difficulty None: drawn per problem from `weights`); unique: distinct prompts.

        Deterministic in (task, split, seed, difficulty). Problems of the other split are drawn and dropped.
        """
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        if difficulty is not None and difficulty not in self.levels:
            raise ValueError(f"{self.name}: difficulty={difficulty!r} is not one of {self.levels}")
        rng = make_rng(self.name, split, seed, difficulty)
        out: list[Problem] = []
        seen: set[str] = set()
        attempts, limit = 0, 1000 + 50 * n
        while len(out) < n:
            attempts += 1
            if attempts > limit:
                raise ValueError(f"{self.name}: found only {len(out)} of {n} {'distinct ' * unique}{split} problems "
                                 f"at difficulty {difficulty} in {limit} draws; ask for fewer or a harder level")
            d = difficulty if difficulty is not None else rng.choices(self.levels, self.weights)[0]
            p = self._generate(rng, d)
            if split_of(p.prompt) != split or (unique and p.prompt in seen):
                continue
            seen.add(p.prompt)
            out.append(self.pose(p))
        return out

    def with_options(self, **options) -> Task:
        """A copy with some fields changed, e.g. get_task("add").with_options(p_err=0.05, template="r1-zero")."""
        posing = {"template": check_template, "extractor": check_extractor}
        fields = [f.name for f in dataclasses.fields(self) if f.name != "name"] if dataclasses.is_dataclass(self) \
            else []
        for key in options:
            if key not in fields and key not in posing:
                raise ValueError(f"{self.name}: unknown option {key!r}; options: {[*fields, *posing]}")
        changes = {k: v for k, v in options.items() if k in fields}
        task = dataclasses.replace(self, **changes) if changes else copy.copy(self)
        for key, check in posing.items():
            if key in options:
                object.__setattr__(task, key, check(options[key]))  # not a field: frozen dataclasses allow this
        return task


from nanoseek.data.tasks.arithmetic import Arithmetic  # noqa: E402  (families subclass Task, defined above)
from nanoseek.data.tasks.countdown import Countdown  # noqa: E402
from nanoseek.data.tasks.equations import LinearEquation  # noqa: E402
from nanoseek.data.tasks.jsonl import JsonlTask, load_jsonl_tasks  # noqa: E402
from nanoseek.data.tasks.word_problems import WordProblem  # noqa: E402

TASKS: dict[str, Task] = {t.name: t for t in (
    Arithmetic("add", "+"), Arithmetic("sub", "-"), Countdown(), LinearEquation(), WordProblem())}


def parse_task_spec(spec: str) -> tuple[str, dict[str, str]]:
    """"name?key=value&key=value" -> (name, options); values URL-unquoted ("+" stays a plus)."""
    name, _, query = spec.partition("?")
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"task {spec!r}: option {item!r} is not key=value")
        options[unquote(key)] = unquote(value)
    return name, options


def get_task(name: str, **options) -> Task:
    """A registered family by name (options override its fields, e.g. p_err), or a user task file `*.jsonl`;
    options may also follow the name ("add?template=r1-zero", see the module docstring)."""
    name, in_name = parse_task_spec(name)
    if name.endswith(".jsonl"):
        return load_jsonl_tasks(name, **{**in_name, **options})
    if name not in TASKS:
        near = difflib.get_close_matches(name, TASKS, n=1)
        raise ValueError(f"unknown task {name!r}{f' (did you mean {near[0]!r}?)' if near else ''}; "
                         f"tasks: {sorted(TASKS)}, or a path to a .jsonl file with prompt and answer fields")
    task = TASKS[name]
    for key, value in in_name.items():  # a field's type, from text: p_err=0.05
        current = getattr(task, key, None)
        if isinstance(current, (int, float)) and not isinstance(current, bool):
            try:
                in_name[key] = type(current)(value)
            except ValueError:
                raise ValueError(f"task {name!r}: option {key}={value!r} must be a {type(current).__name__}") from None
    options = {**in_name, **options}
    return task.with_options(**options) if options else task


__all__ = ["Problem", "Task", "TASKS", "get_task", "split_of", "make_rng", "load_jsonl_tasks", "JsonlTask",
           "Arithmetic", "Countdown", "LinearEquation", "WordProblem", "SPLITS", "TEMPLATES", "R1_ZERO",
           "BOXED_INSTRUCTION", "check_template", "parse_task_spec"]
