"""Prompt templates (prompt_ids, the one prompt builder of eval, rollouts and distillation), prompts that open the
reasoning block (R1), and GRPO-style scoring of a GSM8K-format task file."""

import json
from types import SimpleNamespace

import pytest
import torch

from nanoseek.data.tasks import BOXED_INSTRUCTION, R1_ZERO, Problem, get_task
from nanoseek.rl import evaluate
from nanoseek.rl.evaluate import Prompt, prompt_ids
from nanoseek.rl.grpo import GRPOConfig, group_advantages
from nanoseek.rl.loop import rollout, sample_problems
from nanoseek.rl.rewards import Rewards
from nanoseek.data.tokenizer import Tokenizer
from tests.conftest import deepseek_tokenizer_files
from tests.data.conftest import tokenizer  # noqa: F401  (the built-in tokenizer fixture)

BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    """DeepSeek-R1's published tokenizer and chat template: its generation prompt opens `<think>\\n`."""
    folder = tmp_path_factory.mktemp("r1")
    for name, data in deepseek_tokenizer_files("r1").items():
        (folder / name).write_bytes(data)
    return Tokenizer.load(folder)


def _posed(name: str) -> Problem:
    return get_task(name).generate(0, 3)


def test_templates_render_what_is_expected(tokenizer):  # noqa: F811
    p = _posed("add")
    chat = prompt_ids(p, tokenizer)
    assert isinstance(chat, Prompt) and chat.opener == ""
    assert chat.ids == tokenizer.apply_chat([{"role": "user", "content": p.prompt}])  # today's prompt, unchanged
    assert tokenizer.decode(chat.ids) == f"{BOS}<|user|>{p.prompt}<|assistant|>"
    boxed = prompt_ids(_posed("add?template=boxed"), tokenizer)
    assert tokenizer.decode(boxed.ids) == f"{BOS}<|user|>{p.prompt}\n{BOXED_INSTRUCTION}<|assistant|>"
    zero = prompt_ids(_posed("add?template=r1-zero"), tokenizer)
    assert tokenizer.decode(zero.ids) == BOS + R1_ZERO.replace("{prompt}", p.prompt)
    assert zero.ids[0] == tokenizer.bos_id and zero.opener == ""  # the template's own <think> </think> is closed
    assert tokenizer.decode(zero.ids).endswith(f"</answer>. User: {p.prompt}. Assistant:")
    prefill = prompt_ids(_posed("add?template=Question: {prompt}%0AAssistant: <think>"), tokenizer)  # oat's prefill
    assert tokenizer.decode(prefill.ids) == f"{BOS}Question: {p.prompt}\nAssistant: <think>"
    assert prefill.opener == "<think>"


def test_r1_style_opened_prompt_is_scored_right(r1, monkeypatch):
    p = _posed("add?template=boxed&extractor=boxed")
    prompt = prompt_ids(p, r1)
    assert prompt.opener == "<think>\n" and r1.decode(prompt.ids).endswith("<｜Assistant｜><think>\n")
    # the model continues inside the reasoning block: scored as `<think>\n` + completion
    replies = {True: f"{p.reasoning}</think>\nSo \\boxed{{{p.answer}}}.", False: "no box here</think>\n\\boxed{1"}

    def fake(model, tok, prompts, params, batch_size=64, speculative=False, progress=True):
        return [(replies[q.greedy], 9, "stop") for q in params]

    monkeypatch.setattr(evaluate, "generate_completions", fake)
    result = evaluate.evaluate(SimpleNamespace(eval=lambda: None), r1, [p], k=2, progress=False)
    m = result["overall"]
    assert m["greedy"] == 1.0 and m["greedy_format"] == 1.0 and m["pass@1"] == 0.0 and m["format"] == 0.0
    assert result["samples"][0]["completion"].startswith("<think>\n" + p.reasoning)
    assert result["problems"][0]["greedy_answer"] == p.answer


class FakeEngine:
    """The Engine surface `rollout` uses: add requests, run them; a reply is a function of (prompt text, seed)."""

    def __init__(self, tokenizer, reply):
        self.tokenizer, self.reply, self.requests = tokenizer, reply, []

    def add(self, ids, params, stream=True):
        self.requests.append(SimpleNamespace(prompt=list(ids), params=params))
        return self.requests[-1]

    def run(self):
        for r in self.requests:
            r.text = self.reply(self.tokenizer.decode(r.prompt), r.params.seed)
            r.tokens, r.finish_reason = self.tokenizer.encode(r.text) + [self.tokenizer.eos_id], "stop"


def test_gsm8k_file_through_grpo_scoring(r1, tmp_path):
    rows = [{"question": f"Sam has {i} pens and buys 1,000 more. How many pens?",
             "answer": f"{i} + 1000 = {i + 1000}\n#### {i + 1000:,}"} for i in range(40)]
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = GRPOConfig(tasks=str(path), prompts_per_step=3, group_size=4, max_prompt_tokens=512)
    problems = sample_problems(cfg, step=0)
    assert len({p.prompt for p in problems}) == 3 and all(p.extractor == "boxed" for p in problems)
    gold = {p.prompt: p.answer for p in problems}

    def reply(prompt_text, seed):  # R1-style: inside the opened reasoning; even seeds right, odd ones off by one
        assert prompt_text.endswith(f"{BOXED_INSTRUCTION}<｜Assistant｜><think>\n")
        answer = int(next(a for q, a in gold.items() if q in prompt_text)) + seed % 2
        return f"I add them, \\boxed{{0}}.</think>\nThe total is \\boxed{{{answer:,}}}."

    batch = rollout(FakeEngine(r1, reply), problems, cfg, step=0)
    assert all(t.startswith("<think>\nI add them") for t in batch.texts)
    rewards = Rewards()
    scores = [rewards(problems[n // cfg.group_size], t) for n, t in enumerate(batch.texts)]
    assert [s["accuracy"] for s in scores] == [1.0, 0.0] * 6 and all(s["format"] == 1.0 for s in scores)
    r = torch.tensor([s["total"] for s in scores]).view(-1, cfg.group_size)
    adv = group_advantages(r)
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, 0.5, -0.5]).expand(3, 4) / (r[0].std() + 1e-4))
    assert batch.mask.any(dim=1).all()  # every completion gets loss


def test_one_template_and_extractor_for_every_task():
    """GRPO's template= / extractor= and `nanoseek eval --template --extractor` override each task's own."""
    cfg = GRPOConfig(tasks="add,sub", template="boxed", extractor="boxed", prompts_per_step=6)
    assert {(p.template, p.extractor) for p in sample_problems(cfg, step=0)} == {("boxed", "boxed")}
    assert {(p.template, p.extractor) for p in sample_problems(GRPOConfig(tasks="add"), 0)} == {("chat", "answer_tag")}
    problems, _ = evaluate.load_problems([], 5, seed=0, template="r1-zero")
    assert {p.template for p in problems} == {"r1-zero"} and {p.extractor for p in problems} == {"answer_tag"}
    with pytest.raises(ValueError, match=r"template 'boxd': not one of .* \(did you mean 'boxed'\?\)"):
        GRPOConfig(template="boxd")
    with pytest.raises(ValueError, match="answer reader 'nowhere': not one of"):
        GRPOConfig(extractor="nowhere")
