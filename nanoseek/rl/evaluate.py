"""Held-out accuracy: prompts in the chat format, batched generation, the last <answer>...</answer> checked.

Greedy accuracy here; pass@1 over k samples and maj@k (R1's conventions, r1-spec section 6) build on it.
"""

from __future__ import annotations

import re

from tqdm import tqdm

from nanoseek.data.tasks import Problem, get_task
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.engine import SamplingParams, generate
from nanoseek.model import Transformer

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text of the last <answer>...</answer> block, stripped; None when there is none."""
    found = ANSWER.findall(completion)
    return found[-1].strip() if found else None


def greedy_accuracy(model: Transformer, tok: Tokenizer, problems: list[Problem], max_tokens: int = 96,
                    batch_size: int = 64, progress: bool = True) -> dict:
    """Fraction of problems whose greedy completion's final answer passes the task's checker."""
    model.eval()
    correct, samples = 0, []
    with tqdm(total=len(problems), desc="eval", unit="problem", disable=not progress) as bar:
        for i in range(0, len(problems), batch_size):
            batch = problems[i:i + batch_size]
            prompts = [tok.apply_chat([{"role": "user", "content": p.prompt}]) for p in batch]
            outs = generate(model, prompts, SamplingParams(max_tokens=max_tokens), stop_ids=(tok.eos_id,))
            for p, out in zip(batch, outs):
                text = tok.decode([t for t in out if t != tok.eos_id])
                answer = extract_answer(text)
                ok = answer is not None and get_task(p.task).check(p, answer)
                correct += ok
                if len(samples) < 8:
                    samples.append({"prompt": p.prompt, "completion": text, "answer": p.answer, "correct": ok})
            bar.update(len(batch))
    return {"accuracy": correct / max(len(problems), 1), "n": len(problems), "samples": samples}
