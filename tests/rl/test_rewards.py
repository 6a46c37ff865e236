import json
import threading
import time

import pytest

from nanoseek.data.tasks import Problem, get_task
from nanoseek.rl.rewards import (Rewards, accuracy_reward, format_reward, load_reward_fn, math_safe,
                                 parse_completion)

ADD = Problem("347+586=", "7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0", "933", "add", 3, {"a": 347, "b": 586, "op": "+"})
RIGHT = "<think>7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0</think><answer>933</answer>"


@pytest.mark.parametrize("text, accuracy, fmt", [
    (RIGHT, 1, 1),
    (" \n<think>x</think>\n<answer> 933 </answer>\n", 1, 1),  # whitespace around tags is fine
    (RIGHT + "<|end_of_text|>", 1, 1),  # a decoded stop token is tolerated
    ("<think>x</think><answer>934</answer>", 0, 1),  # well-formed but wrong
    ("", 0, 0),
    ("<think></think><answer></answer>", 0, 0),  # only tags: an empty answer is no answer
    ("<think></think>", 0, 0),
    ("<answer>933</answer>", 1, 0),  # no reasoning: right, not well-formed
    ("933", 0, 0),  # a bare number is not an answer
    ("<think>x</think><answer>933</answer><answer>1</answer>", 0, 0),  # two answer blocks
    ("<think>x</think><answer>933</answer><answer>933</answer>", 0, 0),  # even if both are right
    ("<think>x</think><answer>933", 0, 0),  # unclosed (a truncated completion)
    ("<answer>933</answer><think>x</think>", 0, 0),  # answer before the reasoning
    ("<think>x<answer>933</answer></think>", 0, 0),  # the right answer only inside the reasoning
    ("<think>x<answer>933</answer></think><answer>1</answer>", 0, 0),
    ("<think><think>x</think></think><answer>933</answer>", 0, 0),  # nested think
    ("<think>x</think><think>y</think><answer>933</answer>", 0, 0),  # repeated think
    ("</think><think>x<answer>933</answer>", 0, 0),  # out of order
    ("<think>x<answer>933</answer>", 0, 0),  # unclosed think
    ("<think>x</think><answer>933</answer> and more", 1, 0),  # trailing garbage
    ("<think>x</think><answer>933</answer><|user|>", 1, 0),
    ("hello <think>x</think><answer>933</answer>", 1, 0),  # leading garbage
    ("<think>x</think> so <answer>933</answer>", 1, 0),  # text between the blocks
    ("<think>x</think><answer>933 or 934</answer>", 0, 1),
    ("<think>x</think><answer>0933</answer>", 1, 1),  # the integer checker compares values
    ("<think>x</think><answer>٩٣٣</answer>", 0, 1),  # Arabic-Indic digits
    ("<think>x</think><answer>９３３</answer>", 0, 1),  # full-width digits
    ("<think>x</think><answer>933.0</answer>", 0, 1),  # integer tasks want integers
    ("<think>x</think><answer>" + "9" * 100_000 + "</answer>", 0, 1),  # enormous number
    ("<think>x</think><answer>9**9**9**9</answer>", 0, 1),
])
def test_accuracy_and_format_on_adversarial_outputs(text, accuracy, fmt):
    t0 = time.perf_counter()
    assert accuracy_reward(ADD, text) == accuracy
    assert format_reward(text) == fmt
    assert time.perf_counter() - t0 < 1.0


def test_parse_completion_parts():
    p = parse_completion(RIGHT)
    assert p.reasoning == "7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0" and p.answer == "933" and p.well_formed
    p = parse_completion("<answer> 12\n</answer>")
    assert p.reasoning is None and p.answer == "12" and not p.well_formed
    multi = parse_completion("<think>line 1\nline 2\n</think>\n<answer>\n7\n</answer>")  # DOTALL (open-r1 #235)
    assert multi.well_formed and multi.answer == "7"


def test_every_builtin_reference_completion_is_right_and_well_formed():
    for name in ("add", "sub", "countdown", "linear", "word"):
        for p in get_task(name).sample(20, "heldout", seed=1):
            assert accuracy_reward(p, p.completion) == 1.0 and format_reward(p.completion) == 1.0, p


def test_noisy_trace_answers_are_wrong():
    p = next(p for p in get_task("add", p_err=0.5).sample(50, seed=0) if p.written_answer is not None)
    assert accuracy_reward(p, p.completion) == 0.0 and format_reward(p.completion) == 1.0


COUNTDOWN = Problem("nums 3 7 9 target 30", "", "3*7+9", "countdown", 3, {"nums": [3, 7, 9], "target": 30})


@pytest.mark.parametrize("answer, ok", [
    ("3*7+9", True), ("9+7*3", True), ("(7*3)+9", True), (" 9 + 3 * 7 ", True),  # any valid expression
    ("(9-3+7-3)*3", False),  # reuses a number
    ("3*7+9+0", False), ("3*7+9*1", False),  # extra numbers
    ("3*10", False), ("30", False),  # missing numbers
    ("3*7+8", False),  # wrong value
    ("3**7+9", False), ("x*7+9", False), ("__import__('os')", False),  # not + - * / on literals
    ("9/(3-3)*7", False),  # division by zero
    ("3*7+9" + "+0" * 60, False),  # too long
])
def test_countdown_expressions(answer, ok):
    assert accuracy_reward(COUNTDOWN, f"<think>x</think><answer>{answer}</answer>") == float(ok)


def _jsonl_task(tmp_path, rows):
    path = tmp_path / "math.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return get_task(str(path))


@pytest.mark.parametrize("answer, ok", [
    ("0.5", True), ("1/2", True), (r"\frac{1}{2}", True), (r"\frac{2}{4}", True), (r"\dfrac12", True),
    (r"$\frac{1}{2}$", True), (".5", True),
    ("0.6", False), ("2", False), ("2 or 0.5", False), ("0.5, 2", False), (r"\{0.5, 2\}", False),
    (r"5}\boxed{0.5", False),  # brace injection
    (r"2^{2^{2^{100}}}", False), (r"10^{10^{10}}", False), (r"9^{99999999}", False), ("100000!", False),
    (r"\sum_{i=1}^{10} i", False), ("1" * 10_000, False), ("٠.٥", False), ("half", False),
])
def test_jsonl_latex_answers(tmp_path, answer, ok):
    task = _jsonl_task(tmp_path, [{"prompt": "What is 1/2?", "answer": r"\frac{1}{2}"}])
    (problem,) = task.problems
    text = f"<think>x</think><answer>{answer}</answer>"
    t0 = time.perf_counter()
    assert accuracy_reward(problem, text, task) == float(ok)
    assert accuracy_reward(problem, text) == float(ok)  # without the Task object: the same free-form check
    assert time.perf_counter() - t0 < 3.0


def test_jsonl_other_answers(tmp_path):
    task = _jsonl_task(tmp_path, [{"prompt": "x^2 expanded?", "answer": "x^2+2x+1"},
                                  {"prompt": "capital?", "answer": "Paris"},
                                  {"prompt": "forty-two", "answer": 42}])
    poly, word, num = task.problems
    check = lambda p, a: accuracy_reward(p, f"<think></think><answer>{a}</answer>", task)  # noqa: E731
    assert check(poly, "(x+1)^2") == 1.0 and check(poly, "x^2+2x+2") == 0.0
    assert check(word, "Paris") == 1.0 and check(word, "Pairs") == 0.0  # a word never goes to sympy
    assert check(num, "42") == 1.0 and check(num, "42.0") == 1.0 and check(num, "41") == 0.0


def test_math_outside_the_main_thread_has_no_signal_timeouts():
    task = Problem("half", "", r"\frac{1}{2}", "jsonl:x", 0)
    results = []
    t = threading.Thread(target=lambda: results.extend(
        accuracy_reward(task, f"<answer>{a}</answer>") for a in ("0.5", r"10^{10^{10}}", "0.7")))
    t.start()
    t.join(30)
    assert results == [1.0, 0.0, 0.0]


def test_math_safe():
    assert math_safe("x^2+y^2") and math_safe(r"e^{i\pi}") and math_safe(r"2^{10}")
    assert not math_safe("2^3^4") and not math_safe(r"(10^{10^{5}})!") and not math_safe("}{")


def test_unknown_task_is_an_error():
    with pytest.raises(ValueError, match="no checker for task 'mystery'"):
        accuracy_reward(Problem("p", "", "1", "mystery", 0), "<answer>1</answer>")


# ----------------------------------------------------------------------------- user rewards
USER_MODULE = '''
def brevity(problem, text):
    return -len(text) / 100

def says_hi(problem, text):
    return "hi"

def not_finite(problem, text):
    return float("nan")

def is_bool(problem, text):
    return text.startswith("<think>")

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(USER_MODULE)
    (tmp_path / "broken_rewards.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_load_reward_fn(user_module):
    fn = load_reward_fn("my_rewards:brevity")
    assert fn(ADD, "x" * 50) == -0.5 and fn.__name__ == "brevity"
    by_path = load_reward_fn(f"{user_module / 'my_rewards.py'}:brevity")
    assert by_path(ADD, "x" * 10) == pytest.approx(-0.1)
    assert load_reward_fn("my_rewards:is_bool")(ADD, RIGHT) == 1.0


@pytest.mark.parametrize("spec, message", [
    ("my_rewards", "expected 'module:function'"),
    ("no_such_module_xyz:f", "no module named 'no_such_module_xyz'"),
    ("broken_rewards:f", "importing broken_rewards failed: No module named 'no_such_dependency_xyz'"),
    ("my_rewards:brevty", "has no 'brevty' \\(did you mean 'brevity'\\?\\)"),
    ("my_rewards:NOT_A_FUNCTION", r"NOT_A_FUNCTION is not callable \(int\)"),
    ("missing/dir/file.py:f", "no such file"),
])
def test_load_reward_fn_errors(user_module, spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)


def test_user_reward_results_are_checked(user_module):
    with pytest.raises(ValueError, match=r"my_rewards:says_hi returned 'hi' \(str\).*must be a finite number"):
        load_reward_fn("my_rewards:says_hi")(ADD, RIGHT)
    with pytest.raises(ValueError, match="my_rewards:not_finite returned nan"):
        load_reward_fn("my_rewards:not_finite")(ADD, RIGHT)


def test_combined_rewards(user_module):
    r = Rewards()
    assert r.names == ["accuracy", "format"]
    assert r(ADD, RIGHT) == {"total": pytest.approx(1.1), "accuracy": 1.0, "format": 1.0}
    assert r(ADD, "<answer>933</answer>")["total"] == 1.0  # TinyZero weights: format cannot dominate
    assert r(ADD, "<think>x</think><answer>1</answer>")["total"] == pytest.approx(0.1)
    r1 = Rewards(weights={"format": 1.0}, user_fns=["my_rewards:brevity"])  # R1: same weight
    out = r1(ADD, RIGHT)
    assert r1.names == ["accuracy", "format", "brevity"]
    assert out["brevity"] == pytest.approx(-len(RIGHT) / 100)
    assert out["total"] == pytest.approx(2.0 - len(RIGHT) / 100)
    half = Rewards(weights={"brevity": 0.5}, user_fns=[lambda p, t: 1.0, load_reward_fn("my_rewards:brevity")])
    assert half.names == ["accuracy", "format", "<lambda>", "brevity"]
    with pytest.raises(ValueError, match="reward weight 'acuracy': no such reward \\(did you mean 'accuracy'\\?\\)"):
        Rewards(weights={"acuracy": 1.0})
    with pytest.raises(ValueError, match="the name 'brevity' is taken"):
        Rewards(user_fns=["my_rewards:brevity", f"{user_module / 'my_rewards.py'}:brevity"])


def test_rewards_resolve_jsonl_tasks(tmp_path):
    task = _jsonl_task(tmp_path, [{"prompt": "half", "answer": "1/2"}])
    r = Rewards(tasks=[task])
    assert r(task.problems[0], r"<think></think><answer>\frac{1}{2}</answer>")["accuracy"] == 1.0


# ----------------------------------------------------------------------------- answer extractors
GSM = Problem("Tom has 72 apples. How many?", "", "72", "jsonl:gsm8k", 0, extractor="boxed")


@pytest.mark.parametrize("text, accuracy, fmt", [
    (r"<think>count them</think>The answer is $\boxed{72}$.", 1, 1),
    ("<think>\nline 1\nline 2\n</think>\n\n" + r"\boxed{72}<|end_of_text|>", 1, 1),
    (r"<think>x</think>\boxed{5} no wait, \boxed{72}", 1, 1),  # several boxes: the last
    (r"<think>x</think>\boxed{72} no wait, \boxed{5}", 0, 1),
    (r"<think>x</think>\boxed{\frac{144}{2}}", 1, 1),  # nested braces, then math-verify
    (r"<think>x</think>\boxed{72.0}", 1, 1), (r"<think>x</think>\boxed 72", 1, 1),
    (r"<think>\boxed{72}</think>so it is \boxed{5}", 0, 1),  # a box inside the reasoning is never read
    (r"<think>\boxed{72}</think>so it is 72", 0, 0),
    (r"<think>I think \boxed{72}", 0, 0),  # the reasoning never closed (truncated)
    (r"<think>x</think>\boxed{72", 0, 0),  # an unclosed box
    (r"\boxed{72}", 1, 0),  # no reasoning block: right, not well-formed
    (r"<think>x</think><think>y</think>\boxed{72}", 0, 0),  # broken think tags
    ("<think>x</think><answer>72</answer>", 0, 0),  # the wrong format for this task
    (r"<think>x</think>\boxed{}", 0, 0),
    ("<think>x</think>" + "\\boxed{" * 100_000, 0, 0),  # adversarial: bounded work
])
def test_boxed_answers(text, accuracy, fmt):
    t0 = time.perf_counter()
    assert accuracy_reward(GSM, text) == accuracy
    assert format_reward(text, "boxed") == fmt
    assert Rewards()(GSM, text)["total"] == pytest.approx(accuracy + 0.1 * fmt)
    assert time.perf_counter() - t0 < 1.0


def test_boxed_latex_and_thousands():
    half = Problem("half?", "", r"\frac{1}{2}", "jsonl:math", 0, extractor="boxed")
    assert accuracy_reward(half, r"<think></think>\boxed{\dfrac{1}{2}}") == 1.0
    assert accuracy_reward(half, r"<think></think>\boxed{0.5}") == 1.0
    assert accuracy_reward(half, r"<think></think>\boxed{\frac{1}{3}}") == 0.0
    big = Problem("big?", "", "1234", "jsonl:gsm8k", 0, extractor="boxed")
    assert accuracy_reward(big, r"<think></think>\boxed{1,234}") == 1.0


def test_gsm8k_style_and_user_extractors(tmp_path):
    hashes = Problem("q", "", "-3", "jsonl:g", 0, extractor="gsm8k")
    assert accuracy_reward(hashes, "<think>#### 7</think>so\n#### -3") == 1.0
    (tmp_path / "extract.py").write_text(
        "def last_line(text):\n    lines = text.strip().splitlines()\n    return lines[-1] if lines else None\n"
        "def seen(text):\n    SEEN.append(text)\n    return None\nSEEN = []\n"
        "def broken(text):\n    return 7\n")
    user = Problem("q", "", "72", "jsonl:g", 0, extractor=f"{tmp_path / 'extract.py'}:last_line")
    assert accuracy_reward(user, "<think>a\n72</think>\nthe answer:\n 72 ") == 1.0
    assert accuracy_reward(user, "<think>a\n72</think>\n71") == 0.0
    assert format_reward("<think>a</think>\n72", user.extractor) == 1.0 and format_reward("72", user.extractor) == 0
    spy = Problem("q", "", "72", "jsonl:g", 0, extractor=f"{tmp_path / 'extract.py'}:seen")
    accuracy_reward(spy, "<think>secret 72</think>shown")
    import sys
    module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(tmp_path / "extract.py"))
    assert module.SEEN == ["shown"]  # the user function never sees the reasoning
    bad = Problem("q", "", "72", "jsonl:g", 0, extractor=f"{tmp_path / 'extract.py'}:broken")
    with pytest.raises(ValueError, match=r"returned 7 \(int\); it must return a string or None"):
        accuracy_reward(bad, "<think></think>72")
    with pytest.raises(ValueError, match="answer reader 'boxd'"):
        parse_completion("x", "boxd")
