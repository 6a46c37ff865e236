import time

import pytest

from nanoseek.data.tasks.answers import check_extractor, gsm8k_answer, last_boxed, reader


@pytest.mark.parametrize("text, want", [
    (r"so \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),  # nested braces
    (r"\boxed{\sqrt{\frac{a}{b^{2}}}} done", r"\sqrt{\frac{a}{b^{2}}}"),
    (r"first \boxed{1}, then \boxed{ 2 }", "2"),  # several boxes: the last
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not the box's
    (r"\boxed 5$ and more", "5"), (r"\boxed {7}", "7"),
    (r"\boxed{1} and \boxed{2", None),  # the last box is unclosed (truncated): no answer
    (r"\boxed{12", None), (r"\boxed{}", None), (r"\boxed", None), ("no box", None), (r"\boxed{5}}", "5"),
    (r"\boxed{4} \boxedx", "4"),  # another command that starts with \boxed
])
def test_last_boxed(text, want):
    assert last_boxed(text) == want


def test_last_boxed_is_linear_on_adversarial_text():
    t0 = time.perf_counter()
    assert last_boxed("\\boxed{" * 200_000) is None
    assert last_boxed("\\boxedx" * 200_000) is None
    assert last_boxed("\\boxed{" + "{" * 1_000_000 + "}" * 1_000_000 + "}") == "{" * 1_000_000 + "}" * 1_000_000
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("text, want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", "72"),
    ("... \n#### 1,234,567", "1234567"),  # commas removed
    ("#### -5", "-5"), ("#### 0.25", "0.25"), ("a #### 1\n#### 2", "2"),
    ("no marker 42", None), ("#### ", None),
])
def test_gsm8k_answer(text, want):
    assert gsm8k_answer(text) == want


def test_readers_by_name_and_user_functions(tmp_path):
    assert reader("boxed") is last_boxed and reader("gsm8k") is gsm8k_answer
    (tmp_path / "ex.py").write_text("def last_word(text):\n    return text.split()[-1] if text.split() else None\n"
                                    "def number(text):\n    return 5\n")
    last_word = reader(f"{tmp_path / 'ex.py'}:last_word")
    assert last_word("the answer is 42") == "42" and last_word("  ") is None
    with pytest.raises(ValueError, match=r"returned 5 \(int\); it must return a string or None"):
        reader(f"{tmp_path / 'ex.py'}:number")("x")
    assert check_extractor("answer_tag") == "answer_tag" and check_extractor("boxed") == "boxed"
    with pytest.raises(ValueError, match=r"'boxd': not one of \['answer_tag', 'boxed', 'gsm8k'\] \(did you mean"):
        check_extractor("boxd")
    with pytest.raises(ValueError, match=r"answer reader .*: no such file"):
        reader(f"{tmp_path / 'nope.py'}:f")
