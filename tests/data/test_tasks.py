import hashlib
import re
from fractions import Fraction

import pytest

from nanoseek.data.tasks import TASKS, Problem, get_task, load_jsonl_tasks, split_of
from tests.data.conftest import write_jsonl


def all_levels(n: int = 40, split: str = "train", seed: int = 0):
    for name, task in TASKS.items():
        for d in task.levels:
            yield from task.sample(n, split, seed, d)


# ---------------------------------------------------------------- answers, verified independently of the generators
def independent_answer(p: Problem) -> Fraction | None:
    """The right answer recomputed from the prompt text alone (None for countdown: many answers)."""
    if p.task in ("add", "sub"):
        a, op, b = re.fullmatch(r"(\d+)([+-])(\d+)=", p.prompt).groups()
        return Fraction(int(a) + int(b) if op == "+" else int(a) - int(b))
    if p.task == "linear":
        lhs, rhs = p.prompt.split("=")
        x = int(p.answer)
        side = lambda s: eval(re.sub(r"(\d)x", rf"\1*({x})", s))  # noqa: E731
        assert side(lhs) == side(rhs)  # substitute x
        return Fraction(x)
    if p.task == "word":
        nums = [int(v) for v in re.findall(r"\d+", p.prompt)]
        if len(nums) == 3:
            return Fraction(nums[0] + nums[1] - nums[2])
        taken = any(w in p.prompt for w in ("gives away", "lost", "takes out"))
        return Fraction(nums[0] - nums[1] if taken else nums[0] + nums[1])
    return None


def test_answers_are_correct():
    for p in all_levels():
        if p.task == "countdown":
            nums = [int(v) for v in p.prompt.split(" target ")[0].split()[1:]]
            target = int(p.prompt.split(" target ")[1])
            assert re.fullmatch(r"[\d+\-*/() ]+", p.answer)
            assert sorted(int(v) for v in re.findall(r"\d+", p.answer)) == sorted(nums)
            assert abs(eval(p.answer) - target) < 1e-9 and 0 < target <= 200
            assert p.reasoning.split("|")[-1].endswith(f"={target}")
        else:
            assert Fraction(int(p.answer)) == independent_answer(p), p
        assert TASKS[p.task].check(p, p.answer)
        assert p.written_answer is None


def test_scratchpads_are_right():
    step = {"+": re.compile(r"(\d)\+(\d)(\+1)?=(\d+) c([01])"), "-": re.compile(r"(\d+)-(\d)(-1)?=(\d) b([01])")}
    for p in TASKS["add"].sample(100) + TASKS["sub"].sample(100):
        op = "+" if p.task == "add" else "-"
        a, b = map(int, p.prompt[:-1].split(op))
        carry, digits = 0, []
        for i, s in enumerate(p.reasoning.split("|")):
            x, y, cin, r, c = step[op].fullmatch(s).groups()
            assert int(bool(cin)) == carry
            assert int(x) % 10 == (a // 10**i) % 10 and int(y) == (b // 10**i) % 10  # least significant first
            if op == "+":
                assert int(r) == int(x) + int(y) + carry and int(c) == int(r) // 10
            else:
                assert int(r) == int(x) - int(y) - carry >= 0 and int(x) // 10 == int(c)
            digits.append(int(r) % 10)
            carry = int(c)
        value = int("".join(map(str, reversed(digits)))) + (carry * 10 ** len(digits) if op == "+" else 0)
        assert value == int(p.answer)


def test_documented_examples():
    from nanoseek.data.tasks.arithmetic import add_steps, sub_steps

    assert add_steps(347, 586) == ("7+6=13 c1|4+8+1=13 c1|3+5+1=9 c0".split("|"), 933)
    assert sub_steps(503, 278) == ("13-8=5 b1|10-7-1=2 b1|5-2-1=2 b0".split("|"), 225)
    assert add_steps(99, 1) == (["9+1=10 c1", "9+0+1=10 c1"], 100)


def test_check_rejects_wrong_answers():
    p = TASKS["add"].generate(0, 3)
    assert TASKS["add"].check(p, f" {p.answer} ") and not TASKS["add"].check(p, str(int(p.answer) + 1))
    assert not TASKS["add"].check(p, "") and not TASKS["add"].check(p, "9" * 13) and not TASKS["add"].check(p, "1e3")
    c = TASKS["countdown"]
    q = Problem("nums 3 7 9 target 30", "", "3*7+9", "countdown", 3, {"nums": [3, 7, 9], "target": 30})
    for good in ("3*7+9", "9+7*3", "(9+7*3)", "7*3+9"):
        assert c.check(q, good), good
    for bad in ("30", "3*7+9+0", "3*7*9", "3*7+9*1", "7**2-19", "x+3", "3*7+9;", "3*(7+9)", "9/0+3*7", ""):
        assert not c.check(q, bad), bad


# ---------------------------------------------------------------- determinism, splits, difficulty
def test_determinism():
    for name, task in TASKS.items():
        assert task.sample(20, seed=3) == task.sample(20, seed=3)
        assert task.sample(20, seed=3) != task.sample(20, seed=4)
        assert task.generate(7, task.levels[-1]) == task.generate(7, task.levels[-1])


def test_heldout_split_disjoint_and_stable():
    # the rule itself, pinned: sha1 of the prompt as a big-endian integer, mod 10
    for prompt in ("347+586=", "nums 3 7 9 target 30", "3x+5=26"):
        expect = "heldout" if int(hashlib.sha1(prompt.encode()).hexdigest(), 16) % 10 == 0 else "train"
        assert split_of(prompt) == expect
    assert split_of("2+2=") == "heldout" and split_of("347+586=") == "train"
    train, held = list(all_levels(30, "train")), list(all_levels(30, "heldout"))
    assert all(p.split == "train" for p in train) and all(p.split == "heldout" for p in held)
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    frac = sum(split_of(f"{a}+{b}=") == "heldout" for a in range(100) for b in range(100)) / 10_000
    assert 0.08 < frac < 0.12


def test_unique_heldout_and_exhaustion():
    held = TASKS["add"].sample(8, "heldout", difficulty=1, unique=True)
    assert len({p.prompt for p in held}) == 8
    with pytest.raises(ValueError, match=r"found only \d+ of 50 distinct heldout problems"):
        TASKS["add"].sample(50, "heldout", difficulty=1, unique=True)


def test_difficulty_levels():
    for name, task in TASKS.items():
        assert len(task.levels) >= 3 and len(task.weights) == len(task.levels)
        with pytest.raises(ValueError, match="difficulty=99 is not one of"):
            task.generate(0, 99)
    lengths = [len(TASKS["add"].generate(0, d).prompt) for d in TASKS["add"].levels]
    assert lengths == sorted(lengths)
    assert all(len(p.meta["nums"]) == 4 for p in TASKS["countdown"].sample(10, difficulty=4))


def test_imitation_noise():
    clean = TASKS["add"].sample(200, seed=1, difficulty=3)
    noisy = get_task("add", p_err=0.3).sample(200, seed=1, difficulty=3)
    assert [p.prompt for p in clean] == [p.prompt for p in noisy]  # the noise never changes the problems
    assert [p.answer for p in clean] == [p.answer for p in noisy]
    wrong = [p for p in noisy if p.written_answer is not None]
    assert 0.3 < len(wrong) / len(noisy) < 0.9
    assert all(f"<answer>{p.written_answer}</answer>" in p.document and p.written_answer != p.answer for p in wrong)
    with pytest.raises(ValueError, match="unknown option 'p_err'"):
        get_task("linear", p_err=0.1)
    with pytest.raises(ValueError, match="p_err=2"):
        get_task("sub", p_err=2)


def test_document_format():
    p = TASKS["add"].generate(0, 3)
    assert p.document == f"<|user|>{p.prompt}<|assistant|><think>{p.reasoning}</think><answer>{p.answer}</answer>"
    with pytest.raises(ValueError, match="unknown task 'ad' \\(did you mean 'add'\\?\\)"):
        get_task("ad")


# ---------------------------------------------------------------- user tasks
def test_jsonl_tasks(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "difficulty": i % 2} for i in range(40)]
    rows.append({"prompt": "fixed", "answer": "0.5", "split": "heldout", "source": "me"})
    task = get_task(str(write_jsonl(tmp_path / "t.jsonl", rows)))
    assert task.name == "jsonl:t" and len(task.problems) == 41
    assert task.split_of("fixed") == "heldout"
    n_held = sum(task.split_of(p.prompt) == "heldout" for p in task.problems)
    held = task.sample(n_held, "heldout", unique=True)
    assert "fixed" in {p.prompt for p in held} and all(task.split_of(p.prompt) == "heldout" for p in held)
    with pytest.raises(ValueError, match=f"{n_held} heldout problems, {n_held + 1} asked"):
        task.sample(n_held + 1, "heldout", unique=True)
    train = task.sample(10, "train", seed=1)
    assert train == task.sample(10, "train", seed=1) and all(p.split == "train" for p in train)
    fixed = next(p for p in task.problems if p.prompt == "fixed")
    assert fixed.meta == {"source": "me"} and task.check(fixed, "1/2") and not task.check(fixed, "0.6")


@pytest.mark.parametrize("content, match", [
    ('{"prompt": "a", "answer": 1}\n{"prompt": "b", "text": 2}\n',
     r"t.jsonl:2: missing \['answer'\] \(fields: \['prompt', 'text'\]\)"),
    ('{"question": "a"}\n', r"t.jsonl:1: missing \['prompt', 'answer'\]"),
    ('', r"t.jsonl: no tasks"),
    ('[1, 2]\n', r"t.jsonl:1: expected a JSON object"),
    ('{"prompt": "a", "answer": [1]}\n', r"'answer' must be a string or a number"),
    ('{"prompt": "a", "answer": 1, "split": "test"}\n', r"split='test' must be one of"),
])
def test_jsonl_task_errors(tmp_path, content, match):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_jsonl_tasks(tmp_path / "t.jsonl")


def test_parse_number_is_exact_and_bounded():
    from fractions import Fraction

    from nanoseek.data.tasks import parse_number

    assert parse_number(" -0.50 ") == Fraction(-1, 2) and parse_number("3/4") == Fraction(3, 4)
    assert parse_number("1e3") == 1000 and parse_number("1/0") is None and parse_number("seven") is None
    assert parse_number("٧") is None  # non-ASCII digits are not numbers here
    assert parse_number("1" * 61) is None and parse_number("1" * 40, max_chars=40) == int("1" * 40)


def test_canonical_answers_per_task():
    """How answers vote in maj@k: each task says what parses (integers everywhere; countdown expressions;
    free-form numbers as reduced fractions)."""
    add, cd = TASKS["add"], TASKS["countdown"]
    assert add.canonical(" 007 ") == "7" and add.canonical("7.0") is None
    assert cd.canonical("3 * (7 + 1)") == "3*(7+1)" and cd.canonical("24") == "24" and cd.canonical("3**7") is None


# ---------------------------------------------------------------- templates, extractors and real data layouts
GSM8K_ROWS = [{"question": f"Tom has {i} apples and buys 1,000 more. How many?",
               "answer": f"He has {i} + 1000 = <<{i}+1000={i + 1000}>>{i + 1000}.\n#### {i + 1000:,}"}
              for i in range(30)] + [{"question": "How cold?", "answer": "It is -5.\n#### -5"},
                                     {"question": "How much?", "answer": "Half of 1.5.\n#### 0.75"}]


def test_gsm8k_layout_loads_without_conversion(tmp_path):
    task = get_task(str(write_jsonl(tmp_path / "gsm8k.jsonl", GSM8K_ROWS)))
    first, *_, cold, half = task.problems
    assert first.prompt == GSM8K_ROWS[0]["question"] and first.answer == "1000"  # after ####, commas removed
    assert cold.answer == "-5" and half.answer == "0.75"
    assert first.reasoning == "He has 0 + 1000 = <<0+1000=1000>>1000."  # the worked solution, without ####
    assert (task.template, task.extractor) == ("boxed", "boxed")  # posed as DeepSeekMath evaluates GSM8K
    assert all((p.template, p.extractor) == ("boxed", "boxed") for p in task.sample(5, seed=1))
    assert task.check(first, "1000.0") and task.check(first, "1000") and not task.check(first, "1,001")


def test_math_layout_and_explicit_mappings(tmp_path):
    rows = [{"problem": "Half of one?", "solution": r"It is $\boxed{\frac{1}{2}}$ or \boxed{\frac{1}{2}}.",
             "level": "Level 1"}]
    task = get_task(str(write_jsonl(tmp_path / "math.jsonl", rows)))
    (p,) = task.problems
    assert p.prompt == "Half of one?" and p.answer == r"\frac{1}{2}" and p.meta == {"level": "Level 1"}
    assert (p.template, p.extractor) == ("boxed", "boxed")
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"q": "2+2?", "a": "so #### 4", "id": 1}])
    (q,) = get_task(f"{custom}?prompt_field=q&answer_field=a&gold=gsm8k&template=r1-zero").problems
    assert (q.prompt, q.answer, q.template, q.extractor) == ("2+2?", "4", "r1-zero", "answer_tag")
    (tmp_path / "gold.py").write_text("def last_word(text):\n    return text.split()[-1]\n")
    (r,) = load_jsonl_tasks(custom, prompt_field="q", answer_field="a", gold=f"{tmp_path / 'gold.py'}:last_word",
                            extractor="boxed").problems
    assert r.answer == "4" and r.extractor == "boxed" and r.meta == {"id": 1}
    again = task.with_options(template="chat")  # JSONL options reload the file
    assert again.problems[0].template == "chat" and again.problems[0].extractor == "boxed"


@pytest.mark.parametrize("content, options, match", [
    ('{"question": "a", "answer": "no marker"}\n', {}, r"t.jsonl:1: no gsm8k answer in 'answer'"),
    ('{"problem": "a", "solution": "\\\\boxed{1"}\n', {}, r"t.jsonl:1: no boxed answer in 'solution'"),
    ('{"question": "a", "answer": 3}\n', {}, r"'answer' must be a string, got int"),
    ('{"prompt": "a", "answer": 1}\n', {"gold_field": "x"}, r"unknown option\(s\) \['gold_field'\]"),
    ('{"prompt": "a", "answer": 1}\n', {"template": "r1zero"}, r"template 'r1zero'.*did you mean 'r1-zero'"),
    ('{"prompt": "a", "answer": 1}\n', {"extractor": "box"}, r"answer reader 'box'.*did you mean 'boxed'"),
    ('{"prompt": "a", "answer": 1}\n', {"gold": "answer_tag"}, r"not one of \['plain', 'boxed', 'gsm8k'\]"),
])
def test_jsonl_layout_errors(tmp_path, content, options, match):
    (tmp_path / "t.jsonl").write_text(content)
    with pytest.raises(ValueError, match=match):
        load_jsonl_tasks(tmp_path / "t.jsonl", **options)


def test_templates_and_options_in_task_names():
    from nanoseek.data.tasks import BOXED_INSTRUCTION, R1_ZERO

    p = TASKS["add"].generate(0, 3)
    assert (p.template, p.extractor) == ("chat", "answer_tag")  # built-ins: the format they are trained on
    assert p.posed() == [{"role": "user", "content": p.prompt}]
    boxed = get_task("add?template=boxed&extractor=boxed").generate(0, 3)
    assert boxed.prompt == p.prompt and (boxed.template, boxed.extractor) == ("boxed", "boxed")
    assert boxed.posed() == [{"role": "user", "content": f"{p.prompt}\n{BOXED_INSTRUCTION}"}]
    assert BOXED_INSTRUCTION == "Please reason step by step, and put your final answer within \\boxed{}."
    zero = get_task("add?template=r1-zero").sample(3, seed=2)
    assert all(q.posed() == R1_ZERO.replace("{prompt}", q.prompt) for q in zero)
    assert zero[0].posed().startswith("A conversation between User and Assistant. The user asks a question")
    assert zero[0].posed().endswith(f"<answer> answer here </answer>. User: {zero[0].prompt}. Assistant:")
    custom = get_task("sub?template=Q%3A {prompt} \\boxed{} A%26B%3A <think>").generate(1, 2)  # URL-quoted
    assert custom.posed() == f"Q: {custom.prompt} \\boxed{{}} A&B: <think>"
    noisy = get_task("add?p_err=0.5&template=r1-zero")
    assert noisy.p_err == 0.5 and noisy.template == "r1-zero" and TASKS["add"].template == "chat"
    with pytest.raises(ValueError, match="option p_err='x' must be a float"):
        get_task("add?p_err=x")
    with pytest.raises(ValueError, match="option 'template' is not key=value"):
        get_task("add?template")
    with pytest.raises(ValueError, match=r"unknown option 'templat'; options: \['op', 'p_err', 'template', "):
        get_task("add?templat=chat")
