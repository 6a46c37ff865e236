"""User tasks from a JSONL file: one object per line, a prompt and a gold answer.

Layouts, detected from the first line when no fields are named:
    nanoseek   `prompt`, `answer` (the gold as is)                        chat + answer_tag
    GSM8K      `question`, `answer` ending in `#### 42` (gold: 42)        boxed + boxed
    MATH       `problem`, `solution` (gold: its last \\boxed{...})         boxed + boxed
GSM8K and MATH files are posed as DeepSeekMath and R1 evaluate them (the \\boxed{} instruction, the last box
read). Options (get_task("f.jsonl?gold=boxed") or load_jsonl_tasks(path, ...)): prompt_field, answer_field,
gold (the reader of the answer field: "plain", "gsm8k", "boxed" or a user "module:function", answers.py),
template and extractor (tasks/__init__.py).

Optional fields: `reasoning` (a reference trace, for SFT documents; GSM8K's and MATH's worked solutions
otherwise), `difficulty` (int, default 0) and `split` ("train" or "heldout"; default: the sha1 rule of
`split_of`). Other fields go to `problem.meta`. `check` compares stripped strings, and numbers as numbers
(so "42" == "42.0" and "1/2" == "0.5"); the rewards add math-verify for the rest.
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.data.documents import iter_jsonl
from nanoseek.data.tasks import (SPLITS, Problem, Task, check_template, free_form_canonical, make_rng, parse_number,
                                 split_of)
from nanoseek.data.tasks.answers import check_extractor, reader

PLAIN = "plain"
# layout -> (prompt_field, answer_field, gold, template, extractor)
LAYOUTS = {"nanoseek": ("prompt", "answer", PLAIN, "chat", "answer_tag"),
           "gsm8k": ("question", "answer", "gsm8k", "boxed", "boxed"),
           "math": ("problem", "solution", "boxed", "boxed", "boxed")}
OPTIONS = ("prompt_field", "answer_field", "gold", "template", "extractor")


class JsonlTask(Task):
    free_form = True

    def __init__(self, path: str | Path, problems: list[Problem], splits: list[str], options: dict | None = None):
        self.name, self.path = f"jsonl:{Path(path).stem}", Path(path)
        self.problems, self._splits, self.options = problems, splits, options or {}
        self.levels = tuple(sorted({p.difficulty for p in problems}))
        self._split_by_prompt = {p.prompt: s for p, s in zip(problems, splits)}
        if problems:
            self.template, self.extractor = problems[0].template, problems[0].extractor

    def generate(self, rng, difficulty):
        raise ValueError(f"{self.name}: a JSONL task cannot generate problems; use sample()")

    def with_options(self, **options) -> JsonlTask:
        return load_jsonl_tasks(self.path, **{**self.options, **options})

    def size(self, split: str) -> int:
        return sum(s == split for s in self._splits)

    def split_of(self, prompt: str) -> str:  # honours an explicit `split` field
        return self._split_by_prompt.get(prompt) or split_of(prompt)

    def sample(self, n: int, split: str = "train", seed: int = 0, difficulty: int | None = None,
               unique: bool = False) -> list[Problem]:
        """n problems of the split (with replacement unless unique), in a seeded order."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r} must be one of {SPLITS}")
        pool = [p for p, s in zip(self.problems, self._splits)
                if s == split and (difficulty is None or p.difficulty == difficulty)]
        if not pool or (unique and n > len(pool)):
            raise ValueError(f"{self.path}: {len(pool)} {split} problems"
                             f"{f' at difficulty {difficulty}' if difficulty is not None else ''}, {n} asked")
        rng = make_rng(self.name, split, seed, difficulty)
        return rng.sample(pool, n) if unique else [rng.choice(pool) for _ in range(n)]

    def check(self, problem: Problem, answer: str) -> bool:
        if answer.strip() == problem.answer.strip():
            return True
        a, b = parse_number(answer, 40), parse_number(problem.answer, 40)
        return a is not None and a == b

    def canonical(self, answer: str) -> str | None:
        return super().canonical(answer) or free_form_canonical(answer)


def _layout(first_row: dict, options: dict) -> dict:
    """The options in force: the detected layout's (nanoseek's when none fits), overridden by those given."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"JSONL task: unknown option(s) {unknown}; options: {list(OPTIONS)}")
    fits = [v for v in LAYOUTS.values() if v[0] in first_row and v[1] in first_row]
    chosen = dict(zip(OPTIONS, fits[0] if fits else LAYOUTS["nanoseek"]))
    chosen.update(options)
    check_template(chosen["template"])
    check_extractor(chosen["extractor"])
    if chosen["gold"] != PLAIN:
        reader(chosen["gold"], (PLAIN,))
    return chosen


def load_jsonl_tasks(path: str | Path, **options) -> JsonlTask:
    """Read a user task file (see the module docstring); errors name the file, line and fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such task file")
    problems, splits, opts = [], [], None
    for lineno, row in iter_jsonl(path):
        opts = opts or _layout(row, options)
        pf, af, gold = opts["prompt_field"], opts["answer_field"], opts["gold"]
        missing = [k for k in (pf, af) if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing {missing} (fields: {sorted(row)}); "
                             f"a task line needs {pf!r} and {af!r}")
        prompt, raw = row.pop(pf), row.pop(af)
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{lineno}: {pf!r} must be a non-empty string")
        if not (isinstance(raw, str) or gold == PLAIN and isinstance(raw, (int, float)) and not isinstance(raw, bool)):
            raise ValueError(f"{path}:{lineno}: {af!r} must be a string{' or a number' * (gold == PLAIN)}, "
                             f"got {type(raw).__name__}")
        answer = str(raw) if gold == PLAIN else reader(gold, (PLAIN,))(raw)
        if not answer:
            raise ValueError(f"{path}:{lineno}: no {gold} answer in {af!r} (ends {str(raw)[-60:]!r})")
        split = row.pop("split", None) or split_of(prompt)
        if split not in SPLITS:
            raise ValueError(f"{path}:{lineno}: split={split!r} must be one of {SPLITS}")
        difficulty = row.pop("difficulty", 0)
        if not isinstance(difficulty, int):
            raise ValueError(f"{path}:{lineno}: difficulty={difficulty!r} must be an integer")
        worked = "" if gold == PLAIN else raw.rpartition("####")[0].strip() if gold == "gsm8k" else raw
        reasoning = row.pop("reasoning", worked)
        problems.append(Problem(prompt, str(reasoning), answer, f"jsonl:{path.stem}", difficulty, row,
                                template=opts["template"], extractor=opts["extractor"]))
        splits.append(split)
    if not problems:
        raise ValueError(f"{path}: no tasks (the file is empty)")
    return JsonlTask(path, problems, splits, options)
