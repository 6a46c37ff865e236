"""Held-out evaluation (R1 paper §3's conventions): greedy accuracy, pass@1 over k samples, maj@k, pass@k.

For each problem one greedy completion and k sampled ones (R1: T = 0.6, top-p = 0.95), all queued into one
Engine so continuous batching keeps its rows full. Each sample has its own seed, a hash of (seed, prompt,
sample index), so a problem's samples do not depend on which other problems are evaluated with it.
Prompts are posed by each problem's template (`prompt_ids`, the one prompt builder of eval, GRPO rollouts and
distillation); completions, after the think block the prompt opened, are scored by nanoseek.rl.rewards
(accuracy: the answer its extractor reads after the reasoning passes the task's checker; format: well-formed).

    greedy     mean over problems of the greedy completion's accuracy
    pass@1     (1/n) sum_q c_q / k, with the standard error over questions std(c_q / k) / sqrt(n) (R1's pass@1)
    maj@k      the most frequent canonical final answer among the k samples is scored (R1 paper §3's cons@k):
               integers canonical ("007" -> "7"), unparseable answers do not vote, none -> wrong, ties -> the
               answer of the earliest sample
    pass@j     unbiased (Chen et al. 2021): 1 - C(k - c, j) / C(k, j), averaged, for j in {1, 4, k}, j <= k
    format     fraction of sampled completions that are well-formed; greedy_format for the greedy ones
    length     mean sampled completion length in tokens (the end-of-text token counted); greedy_length
    truncated  fraction of sampled completions cut at max_tokens

Left out: R1's cons@64 naming (same as maj@64 here), and symbolic canonicalization for voting: free-form
answers vote as numbers or whitespace-normalized strings, so "\\frac{1}{2}" and "0.5" vote apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from nanoseek.data.tasks import Problem, Task, free_form_canonical
from nanoseek.data.tasks.answers import ANSWER_TAG
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.data.chat_template import opened_reasoning
from nanoseek.rl.rewards import MAX_ANSWER_CHARS, answer_correct, parse_completion, resolve_task

N_SHOWN = 8  # problems whose completions the result shows in "samples"


def extract_answer(completion: str, extractor: str = ANSWER_TAG) -> str | None:
    """The completion's final answer (rewards.parse_completion), e.g. the stripped content of the one <answer>
    block after the reasoning; None when there is none or several."""
    return parse_completion(completion, extractor).answer


class Prompt(NamedTuple):
    ids: list[int]
    opener: str  # the think block the prompt leaves open ("<think>\n" for R1), scored before the completion


def prompt_ids(problem: Problem, tokenizer) -> Prompt:
    """The problem as its template poses it (Problem.posed): chat messages through the model's own chat template
    (`tokenizer.apply_chat`, with the generation prompt), raw text (r1-zero, custom) encoded after bos. opener:
    the think block the prompt leaves open (R1's template opens `<think>\\n`), so `opener + completion` is what
    the rewards read."""
    posed = problem.posed()
    if isinstance(posed, str):
        return Prompt(tokenizer.encode(posed, bos=True), opened_reasoning(posed))
    return Prompt(tokenizer.apply_chat(posed, add_generation_prompt=True), tokenizer.template.reasoning_opener)


# ----------------------------------------------------------------------------- metrics (pure)
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k) (Chen et al. 2021, stable form)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_and_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error std(values, ddof=1) / sqrt(n) (0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """Index of the sample whose (canonical) answer wins the vote: the most frequent non-None answer, ties to
    the answer seen first; the index is that answer's earliest sample. None when no sample votes."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == best)


def canonical_answer(answer: str | None, task: Task | None) -> str | None:
    """The answer as it votes in maj@k (`Task.canonical`; a task-less problem's answers are free-form), None when
    it is missing, blank, too long or does not parse for the task."""
    if answer is None or not answer.strip() or len(answer) > MAX_ANSWER_CHARS:
        return None
    return task.canonical(answer) if task is not None else free_form_canonical(answer)


@dataclass
class Scored:
    """One problem's completions, scored: the greedy one, then the k samples (lists of length k)."""
    task: str
    greedy_correct: bool
    greedy_format: bool
    greedy_length: int
    correct: list[bool]
    format: list[bool]
    length: list[int]
    truncated: list[bool]
    canonical: list[str | None]

    @property
    def maj_index(self) -> int | None:
        return majority_vote(self.canonical)

    @property
    def maj_correct(self) -> bool:
        i = self.maj_index
        return i is not None and self.correct[i]


def summarize(scored: Sequence[Scored], k: int) -> dict:
    """The metrics of the module docstring over a group of problems (k = 0: greedy metrics only)."""
    n = len(scored)
    out = {"n": n, "greedy": sum(s.greedy_correct for s in scored) / n,
           "greedy_format": sum(s.greedy_format for s in scored) / n,
           "greedy_length": sum(s.greedy_length for s in scored) / n}
    if k == 0:
        return out
    p1, se = mean_and_se([sum(s.correct) / k for s in scored])
    out |= {"pass@1": p1, "pass@1_se": se, f"maj@{k}": sum(s.maj_correct for s in scored) / n}
    for j in sorted({1, 4, k}):
        if j <= k:
            out[f"pass@{j}"] = sum(pass_at_k(k, sum(s.correct), j) for s in scored) / n
    m = n * k
    out |= {"format": sum(sum(s.format) for s in scored) / m, "length": sum(sum(s.length) for s in scored) / m,
            "truncated": sum(sum(s.truncated) for s in scored) / m}
    return out


# ----------------------------------------------------------------------------- generation and scoring
def sample_seed(seed: int, prompt: str, i: int) -> int:
    """The seed of sample i of a prompt: a hash of (seed, prompt, i), below 2**63."""
    digest = hashlib.sha256(f"{seed}\x1f{prompt}\x1f{i}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def generate_completions(model, tokenizer, prompts: list[list[int]], params: list[SamplingParams],
                         batch_size: int = 64, speculative: bool = False, progress: bool = True
                         ) -> list[tuple[str, int, str]]:
    """(text, generated tokens, finish reason) for each (prompt ids, params), all through one Engine."""
    max_len = max(len(p) for p in prompts) + max(q.max_tokens for q in params)
    engine = Engine(model, tokenizer, max_batch=batch_size, max_len=max_len, speculative=speculative)
    requests = [engine.add(ids, q, stream=False) for ids, q in zip(prompts, params)]
    with tqdm(total=len(requests), desc="eval", unit="completion", disable=not progress) as bar:
        while engine.has_work():
            bar.update(sum(u.done for u in engine.step()))
    return [(r.text, len(r.tokens), r.finish_reason) for r in requests]


def evaluate(model, tokenizer, problems: list[Problem], k: int = 8, temperature: float = 0.6, top_p: float = 0.95,
             max_tokens: int = 96, seed: int = 0, batch_size: int = 64, progress: bool = True,
             tasks: Iterable[Task] = (), speculative: bool = False) -> dict:
    """Greedy + k samples per problem; returns {"settings", "overall", "tasks" (per task name), "problems"
    (one row each), "samples" (the first N_SHOWN problems' completions)}. `tasks`: Task objects for problems
    of unregistered tasks (JSONL), as in rewards.Rewards."""
    if not problems:
        raise ValueError("no problems to evaluate")
    if k < 0:
        raise ValueError(f"k={k} must be >= 0 (0: greedy only)")
    registry = {t.name: t for t in tasks}
    task_of = {p.task: resolve_task(p, registry) for p in problems}
    model.eval()
    greedy = SamplingParams(max_tokens=max_tokens)
    prompts, openers, params = [], [], []
    for p in problems:
        prompt = prompt_ids(p, tokenizer)
        prompts += [prompt.ids] * (k + 1)
        openers.append(prompt.opener)
        params += [greedy] + [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                             seed=sample_seed(seed, p.prompt, i)) for i in range(k)]
    t0 = time.perf_counter()
    outs = generate_completions(model, tokenizer, prompts, params, batch_size, speculative, progress)
    seconds = time.perf_counter() - t0

    scored, rows, shown = [], [], []
    for j, p in enumerate(problems):
        task = task_of[p.task]
        group = [(openers[j] + text, n, r) for text, n, r in outs[j * (k + 1):(j + 1) * (k + 1)]]
        parsed = [parse_completion(text, p.extractor) for text, _, _ in group]
        correct = [answer_correct(p, q.answer, task) for q in parsed]
        s = Scored(p.task, correct[0], parsed[0].well_formed, group[0][1], correct[1:],
                   [q.well_formed for q in parsed[1:]], [n for _, n, _ in group[1:]],
                   [r == "length" for _, _, r in group[1:]], [canonical_answer(q.answer, task) for q in parsed[1:]])
        scored.append(s)
        maj = s.maj_index
        rows.append({"task": p.task, "prompt": p.prompt, "answer": p.answer, "greedy_answer": parsed[0].answer,
                     "greedy_correct": s.greedy_correct, "correct": sum(s.correct), "k": k,
                     "maj_answer": None if maj is None else parsed[1 + maj].answer, "maj_correct": s.maj_correct})
        if j < N_SHOWN:
            shown.append({"task": p.task, "prompt": p.prompt, "answer": p.answer, "completion": group[0][0],
                          "correct": s.greedy_correct,
                          "samples": [{"completion": text, "correct": c} for (text, _, _), c in
                                      zip(group[1:3], correct[1:3])]})
    by_task = defaultdict(list)
    for s in scored:
        by_task[s.task].append(s)
    tokens = sum(n for _, n, _ in outs)
    return {"settings": {"n": len(problems), "k": k, "temperature": temperature, "top_p": top_p,
                         "max_tokens": max_tokens, "seed": seed, "seconds": round(seconds, 3), "tokens": tokens,
                         "tok/s": round(tokens / max(seconds, 1e-9), 1)},
            "overall": summarize(scored, k), "tasks": {name: summarize(g, k) for name, g in sorted(by_task.items())},
            "problems": rows, "samples": shown}


def greedy_accuracy(model, tok, problems: list[Problem], max_tokens: int = 96, batch_size: int = 64,
                    progress: bool = True) -> dict:
    """Fraction of problems whose greedy completion's final answer passes the task's checker:
    {"accuracy", "n", "samples": [{prompt, completion, answer, correct}]}."""
    result = evaluate(model, tok, problems, k=0, max_tokens=max_tokens, batch_size=batch_size, progress=progress)
    samples = [{key: s[key] for key in ("prompt", "completion", "answer", "correct")} for s in result["samples"]]
    return {"accuracy": result["overall"]["greedy"], "n": result["overall"]["n"], "samples": samples}


def heldout_section(model, tok, problems: list[Problem], progress: bool = True) -> tuple[dict, float]:
    """Greedy held-out accuracy as a report section (with four sample completions), and the accuracy."""
    ev = greedy_accuracy(model, tok, problems, progress=progress)
    section = {"problems": ev["n"], "accuracy": f"{ev['accuracy']:.1%}"} | {
        f"sample {i}": f"`{s['prompt']}` -> `{s['completion']}` ({'right' if s['correct'] else 'wrong'})"
        for i, s in enumerate(ev["samples"][:4])}
    return section, ev["accuracy"]


# ----------------------------------------------------------------------------- `nanoseek eval`
def format_table(result: dict) -> str:
    """Per task and overall: n, greedy, pass@1 ± se, maj@k, pass@j, format rate, mean length."""
    k = result["settings"]["k"]
    more = [j for j in sorted({4, k}) if 1 < j <= k]  # pass@j columns besides pass@1
    cols = ["task", "n", "greedy", *(["pass@1 ± se", f"maj@{k}", *[f"pass@{j}" for j in more]] if k else []),
            "format", "length"]

    def row(name, m):
        pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
        cells = [name, str(m["n"]), pct(m["greedy"])]
        if k:
            cells += [f"{pct(m['pass@1'])} ± {pct(m['pass@1_se'])}", pct(m[f"maj@{k}"]),
                      *[pct(m[f"pass@{j}"]) for j in more]]
        cells += [pct(m["format"] if k else m["greedy_format"]), f"{m['length'] if k else m['greedy_length']:.1f}"]
        return cells

    body = [row(name, m) for name, m in result["tasks"].items()] + [row("overall", result["overall"])]
    widths = [max(len(c), *(len(r[i]) for r in body)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
             for cells in [cols, *body]]
    return "\n".join(lines)


def load_problems(task_names: Sequence[str], n: int, seed: int, **options) -> tuple[list[Problem], list[Task]]:
    """n held-out problems per task (distinct prompts; a JSONL file gives at most its held-out ones), or with
    no names n problems of the built-in held-out mix; options (template, extractor) override each task's."""
    from nanoseek.data.builtin import heldout
    from nanoseek.data.tasks import get_task

    if n < 1:
        raise ValueError(f"--n {n} must be >= 1")
    if not task_names:  # the built-in mix, posed as the options say
        return [get_task(p.task, **options).pose(p) for p in heldout(n, seed=seed)], []
    problems, tasks = [], []
    for name in task_names:
        task = get_task(name, **options)
        size = task.size("heldout")  # a JSONL file's held-out problems: at most all of them
        problems += task.sample(min(n, size) if size else n, split="heldout", seed=seed, unique=True)
        tasks.append(task)
    return problems, tasks


def main(args) -> int:
    """`nanoseek eval CHECKPOINT [--task ...] [--template] [--extractor] [--n] [--k] [--temperature] [--top-p]
    [--max-tokens] [--seed] [--out FILE.json]`: print the table, write the JSON report."""
    from nanoseek import quant
    from nanoseek.hf import load_pretrained

    options = {k: v for k, v in (("template", args.template), ("extractor", args.extractor)) if v}
    problems, tasks = load_problems(args.task, args.n, args.seed, **options)
    spec = quant.parse(args.quantize, args.group_size, args.quantize_head)
    pre = load_pretrained(args.checkpoint, device=args.device or ("cpu" if isinstance(spec, quant.Spec) else None),
                          dtype=args.dtype,
                          needs_tokenizer="evaluation", quantize=spec)
    SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p)  # validate early
    result = evaluate(pre.model, pre.tokenizer, problems, k=args.k, temperature=args.temperature, top_p=args.top_p,
                      max_tokens=args.max_tokens, seed=args.seed, batch_size=args.max_batch,
                      tasks=tasks, speculative=args.speculative)
    result = {"checkpoint": str(args.checkpoint), "weights": str(pre.weights),
              "problems_from": list(args.task) or "builtin-heldout", **result}
    print(format_table(result))
    st = result["settings"]
    print(f"{st['n']} problems x (1 greedy + {st['k']} samples at T={st['temperature']}, top-p={st['top_p']}), "
          f"seed {st['seed']}: {st['tokens']} tokens in {st['seconds']:.1f} s")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"report: {out}")
    return 0
