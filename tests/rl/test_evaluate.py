import json
import math
from types import SimpleNamespace

import pytest

from nanoseek.cli import main
from nanoseek.data.builtin import ensure_builtin_data, heldout
from nanoseek.data.shards import ShardSet
from nanoseek.data.tasks import TASKS, Problem
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import generate
from nanoseek.infer.sampling import SamplingParams
from nanoseek.rl import evaluate
from nanoseek.rl.evaluate import (Scored, canonical_answer, extract_answer, greedy_accuracy, majority_vote,
                                  mean_and_se, pass_at_k, sample_seed, summarize)
from nanoseek.rl.rewards import accuracy_reward


@pytest.mark.parametrize("text, want", [
    ("<think>1+1=2</think><answer>2</answer>", "2"),
    ("<answer>3</answer> then <answer> 4 </answer>", None),  # several answer blocks: no answer
    ("<think>no answer</think>", None),
    ("<answer>\n12\n</answer>", "12"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_extract_answer_per_extractor():
    text = "<think>\\boxed{1} <answer>1</answer></think>\\boxed{2} then \\boxed{\\frac{3}{4}}"
    assert extract_answer(text, "boxed") == "\\frac{3}{4}" and extract_answer(text) is None


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("n, c, k, want", [
    (4, 2, 2, 1 - math.comb(2, 2) / math.comb(4, 2)),  # 5/6
    (4, 2, 1, 0.5), (8, 3, 1, 3 / 8),  # pass@1 = c / n
    (8, 0, 4, 0.0), (8, 8, 4, 1.0), (8, 5, 4, 1.0),  # n - c < k: some draw of k must hit
    (10, 3, 4, 1 - math.comb(7, 4) / math.comb(10, 4)),
    (200, 1, 100, 0.5),
])
def test_pass_at_k(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def test_pass_at_k_errors():
    for n, c, k in [(4, 5, 1), (4, -1, 1), (4, 2, 5), (4, 2, 0)]:
        with pytest.raises(ValueError, match="pass_at_k needs"):
            pass_at_k(n, c, k)


@pytest.mark.parametrize("answers, want", [
    (["7", "8", "8"], 1),
    (["8", "7", "7", "8"], 0),  # tie: the answer seen first wins
    (["7", "8", "7", "8"], 0),
    ([None, "8", None, "7"], 1),  # unparseable answers do not vote
    ([None, None, "5", None, "6", "6"], 4),  # the earliest sample of the winning answer
    ([None, None], None), ([], None),
])
def test_majority_vote(answers, want):
    assert majority_vote(answers) == want


def test_canonical_answers():
    add, cd = TASKS["add"], TASKS["countdown"]
    assert canonical_answer("007", add) == "7" and canonical_answer("-0", add) == "0"
    assert canonical_answer("7.0", add) is None and canonical_answer("٧", add) is None
    assert canonical_answer(None, add) is None and canonical_answer("  ", add) is None
    assert canonical_answer("1" * 13, add) is None
    assert canonical_answer(" 3 * 7 + 9", cd) == "3*7+9" and canonical_answer("3**7", cd) is None
    assert canonical_answer("0.50", None) == "1/2" == canonical_answer("2/4", None)
    assert canonical_answer(r"\frac{1}{2}  ", None) == r"\frac{1}{2}"
    # maj@k over canonical answers: "07" and "7" vote together
    votes = [canonical_answer(a, add) for a in ["8", "07", "x", "7", "8 "]]
    assert votes == ["8", "7", None, "7", "8"] and majority_vote(votes) == 0


def test_mean_and_se():
    assert mean_and_se([1.0]) == (1.0, 0.0)
    mean, se = mean_and_se([0.0, 0.5, 1.0, 0.5])
    assert mean == 0.5 and se == pytest.approx(math.sqrt(1 / 6) / 2)


def _scored(task, greedy, correct, answers, fmt=None, length=None):
    k = len(correct)
    return Scored(task, greedy, True, 10, list(correct), fmt or [True] * k, length or [10] * k, [False] * k,
                  list(answers))


def test_summarize_known_completions():
    scored = [
        _scored("add", True, [True, False, True, False], ["5", "6", "5", "6"]),  # maj: "5" first -> right
        _scored("add", False, [False, False, False, True], ["6", "6", None, "5"]),  # maj "6" -> wrong
        _scored("sub", False, [False] * 4, [None] * 4, fmt=[False, True, False, False], length=[2, 4, 6, 8]),
    ]
    m = summarize(scored, 4)
    assert m["n"] == 3 and m["greedy"] == pytest.approx(1 / 3)
    assert m["pass@1"] == pytest.approx((0.5 + 0.25 + 0) / 3)
    assert m["pass@1_se"] == pytest.approx(mean_and_se([0.5, 0.25, 0.0])[1])
    assert m["maj@4"] == pytest.approx(1 / 3)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert set(m) >= {"pass@1", "pass@4", "format", "length", "truncated", "greedy_format", "greedy_length"}
    assert m["format"] == pytest.approx(9 / 12) and m["length"] == pytest.approx((80 + 20) / 12)
    m2 = summarize(scored, 4)
    assert m2 == m
    g = summarize(scored, 0)
    assert "pass@1" not in g and g["greedy"] == pytest.approx(1 / 3)


def test_sample_seeds_differ_and_are_stable():
    seeds = {sample_seed(0, p, i) for p in ("1+1=", "2+2=") for i in range(4)}
    assert len(seeds) == 8 and sample_seed(0, "1+1=", 0) == sample_seed(0, "1+1=", 0) != sample_seed(1, "1+1=", 0)


# ----------------------------------------------------------------------------- greedy_accuracy (faked model)
def test_greedy_accuracy_checks_the_final_answer(tmp_path, monkeypatch):
    tok = ShardSet.open(ensure_builtin_data(tmp_path, vocab_size=512, n_train_docs=300, progress=False)).tokenizer()
    problems = heldout(6)
    answers = {}

    def fake(model, tokenizer, prompts, params, batch_size=64, speculative=False, progress=True):
        assert all(q.greedy for q in params) and len(prompts) == 6
        return [(answers[tok.decode(ids)], 5, "stop") for ids in prompts]

    monkeypatch.setattr(evaluate, "generate_completions", fake)

    class Dummy:
        def eval(self):
            return self

    for i, p in enumerate(problems):
        text = tok.decode(tok.apply_chat([{"role": "user", "content": p.prompt}]))
        answers[text] = p.completion if i % 2 == 0 else "<think>?</think><answer>-1</answer>"
    result = greedy_accuracy(Dummy(), tok, problems, progress=False)
    assert result["accuracy"] == pytest.approx(0.5) and result["n"] == 6
    assert [s["correct"] for s in result["samples"]] == [True, False] * 3
    assert set(result["samples"][0]) == {"prompt", "completion", "answer", "correct"}


# ----------------------------------------------------------------------------- end to end on a tiny model
def test_evaluate_tiny_model(tiny_run):
    run, _ = tiny_run
    pre = load_pretrained(run)
    model, tok = pre.model, pre.tokenizer
    problems = heldout(4, seed=3)
    result = evaluate.evaluate(model, tok, problems, k=2, max_tokens=8, seed=0, batch_size=5, progress=False)
    st, overall = result["settings"], result["overall"]
    assert st["n"] == 4 and st["k"] == 2 and st["tokens"] > 0
    for key in ("greedy", "pass@1", "maj@2", "pass@2", "format", "greedy_format", "truncated"):
        assert 0.0 <= overall[key] <= 1.0, key
    assert overall["pass@1"] <= overall["pass@2"] and 1 <= overall["length"] <= 8
    assert set(result["tasks"]) == {p.task for p in problems}
    assert sum(m["n"] for m in result["tasks"].values()) == 4
    assert len(result["problems"]) == 4 and len(result["samples"]) == 4
    rows = result["problems"]
    assert overall["pass@1"] == pytest.approx(sum(r["correct"] for r in rows) / 8)

    # greedy accuracy equals a direct recomputation with `generate`
    prompts = [tok.apply_chat([{"role": "user", "content": p.prompt}]) for p in problems]
    outs = generate(model, prompts, SamplingParams(max_tokens=8), stop_ids=(tok.eos_id,))
    texts = [tok.decode([t for t in out if t != tok.eos_id]) for out in outs]
    assert [s["completion"] for s in result["samples"]] == texts
    assert overall["greedy"] == pytest.approx(sum(accuracy_reward(p, t) for p, t in zip(problems, texts)) / 4)
    assert greedy_accuracy(model, tok, problems, max_tokens=8, progress=False)["accuracy"] == overall["greedy"]

    # reproducible: same seed, same samples, whatever the batch size
    again = evaluate.evaluate(model, tok, problems, k=2, max_tokens=8, seed=0, batch_size=16, progress=False)
    assert again["samples"] == result["samples"] and again["overall"] == overall


def test_evaluate_reference_completions_score_perfectly(monkeypatch):
    problems = heldout(5, seed=1)
    by_prompt = {p.prompt: p for p in problems}

    class Tok:  # "ids" are the prompt text
        template = SimpleNamespace(reasoning_opener="")

        def apply_chat(self, messages, add_generation_prompt=True):
            return messages[0]["content"]

        def decode(self, ids):
            return ids

    def fake(model, tokenizer, prompts, params, batch_size=64, speculative=False, progress=True):
        return [(by_prompt[p].completion, 12, "stop") for p in prompts]

    class Dummy:
        def eval(self):
            return self

    monkeypatch.setattr(evaluate, "generate_completions", fake)
    result = evaluate.evaluate(Dummy(), Tok(), problems, k=4, progress=False)
    m = result["overall"]
    assert m["greedy"] == m["pass@1"] == m["maj@4"] == m["pass@4"] == m["format"] == 1.0
    assert m["pass@1_se"] == 0.0 and m["length"] == 12 and m["truncated"] == 0.0
    with pytest.raises(ValueError, match="no problems"):
        evaluate.evaluate(Dummy(), Tok(), [], progress=False)
    with pytest.raises(ValueError, match="no checker for task 'mystery'"):
        evaluate.evaluate(Dummy(), Tok(), [Problem("p", "", "1", "mystery", 0)], progress=False)


def test_eval_command(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    out = tmp_path / "report" / "eval.json"
    assert main(["eval", str(run), "--n", "3", "--k", "2", "--max-tokens", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "pass@1 ± se" in printed and "maj@2" in printed
    report = json.loads(out.read_text())
    assert report["settings"]["n"] == 3 and report["problems_from"] == "builtin-heldout"
    assert set(report["overall"]) >= {"greedy", "pass@1", "pass@1_se", "maj@2", "pass@2", "format", "length"}

    jsonl = tmp_path / "user.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i), "split": "heldout"}) + "\n"
                             for i in range(3)))
    out2 = tmp_path / "eval2.json"
    assert main(["eval", str(run), "--task", "add", "--task", str(jsonl), "--n", "2", "--k", "0",
                 "--max-tokens", "4", "--out", str(out2)]) == 0
    report = json.loads(out2.read_text())
    assert set(report["tasks"]) == {"add", "jsonl:user"} and report["settings"]["n"] == 4
    assert "pass@1" not in report["overall"]

    assert main(["eval", str(run), "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err
    assert main(["eval", str(run), "--k", "-1", "--n", "1"]) == 2
    assert "k=-1 must be >= 0" in capsys.readouterr().err
