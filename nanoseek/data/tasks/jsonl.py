"""User tasks from a JSONL file: one object per line with `prompt` and `answer`.

Optional fields: `reasoning` (a reference trace, for SFT documents), `difficulty` (int, default 0) and
`split` ("train" or "heldout"; default: the sha1 rule of `split_of`). Other fields go to `problem.meta`.
`check` compares stripped strings, and numbers as numbers (so "42" == "42.0" and "1/2" == "0.5").
"""

from __future__ import annotations

from pathlib import Path

from nanoseek.data.documents import iter_jsonl
from nanoseek.data.tasks import SPLITS, Problem, Task, free_form_canonical, make_rng, parse_number, split_of


class JsonlTask(Task):
    free_form = True
    def __init__(self, path: str | Path, problems: list[Problem], splits: list[str]):
        self.name, self.path = f"jsonl:{Path(path).stem}", Path(path)
        self.problems, self._splits = problems, splits
        self.levels = tuple(sorted({p.difficulty for p in problems}))
        self._split_by_prompt = {p.prompt: s for p, s in zip(problems, splits)}

    def generate(self, rng, difficulty):
        raise ValueError(f"{self.name}: a JSONL task cannot generate problems; use sample()")

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


def load_jsonl_tasks(path: str | Path) -> JsonlTask:
    """Read a user task file (see the module docstring); errors name the file, line and fields."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such task file")
    problems, splits = [], []
    for lineno, row in iter_jsonl(path):
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing {missing} (fields: {sorted(row)}); "
                             f"a task line needs 'prompt' and 'answer'")
        prompt, answer = row.pop("prompt"), row.pop("answer")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
        if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
            raise ValueError(f"{path}:{lineno}: 'answer' must be a string or a number, "
                             f"got {type(answer).__name__}")
        split = row.pop("split", None) or split_of(prompt)
        if split not in SPLITS:
            raise ValueError(f"{path}:{lineno}: split={split!r} must be one of {SPLITS}")
        difficulty = row.pop("difficulty", 0)
        if not isinstance(difficulty, int):
            raise ValueError(f"{path}:{lineno}: difficulty={difficulty!r} must be an integer")
        reasoning = row.pop("reasoning", "")
        problems.append(Problem(prompt, str(reasoning), str(answer), f"jsonl:{path.stem}", difficulty, row))
        splits.append(split)
    if not problems:
        raise ValueError(f"{path}: no tasks (the file is empty)")
    return JsonlTask(path, problems, splits)
