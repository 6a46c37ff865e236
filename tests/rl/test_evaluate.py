import pytest

from nanoseek.data.builtin import ensure_builtin_data, heldout
from nanoseek.data.shards import ShardSet
from nanoseek.rl import evaluate
from nanoseek.rl.evaluate import extract_answer, greedy_accuracy


@pytest.mark.parametrize("text, want", [
    ("<think>1+1=2</think><answer>2</answer>", "2"),
    ("<answer>3</answer> then <answer> 4 </answer>", "4"),  # the last block counts
    ("<think>no answer</think>", None),
    ("<answer>\n12\n</answer>", "12"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_greedy_accuracy_checks_the_final_answer(tmp_path, monkeypatch):
    tok = ShardSet.open(ensure_builtin_data(tmp_path, vocab_size=512, n_train_docs=300, progress=False)).tokenizer()
    problems = heldout(6)
    answers = {}

    def fake_generate(model, prompts, params, stop_ids=()):
        outs = []
        for ids in prompts:
            p = answers[tok.decode(ids)]
            outs.append(tok.encode(p) + [tok.eos_id])
        return outs

    monkeypatch.setattr(evaluate, "generate", fake_generate)

    class Dummy:
        def eval(self):
            return self

    for i, p in enumerate(problems):
        text = tok.decode(tok.apply_chat([{"role": "user", "content": p.prompt}]))
        answers[text] = p.completion if i % 2 == 0 else "<think>?</think><answer>-1</answer>"
    result = greedy_accuracy(Dummy(), tok, problems, progress=False)
    assert result["accuracy"] == pytest.approx(0.5) and result["n"] == 6
    assert [s["correct"] for s in result["samples"]] == [True, False] * 3
