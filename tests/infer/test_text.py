import pytest

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.text import ReasoningSplitter, TextStream, readable, split_reasoning

TEXT = "<think>2+2: 二加二 is 4 🎉</think>The answer is 4.<|end_of_text|>"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(iter(["The answer is 4. 2+2=4", "hello world"] * 20), 300,
                           tmp_path_factory.mktemp("tok"))


def stream_all(tok, ids, **kw):
    s = TextStream(tok, **kw)
    deltas = [s.push([i]) for i in ids]
    deltas.append(s.finish())
    return s, deltas


def test_deltas_join_to_the_decoded_text_and_never_split_a_character(tok):
    ids = tok.encode(TEXT)
    s, deltas = stream_all(tok, ids, skip_ids=frozenset({tok.eos_id}))
    assert "".join(deltas) == TEXT.replace("<|end_of_text|>", "") == s.text
    assert not any("\ufffd" in d for d in deltas)  # multi-byte characters arrive whole


def test_a_lazy_stream_decodes_once_at_the_end(tok, monkeypatch):
    ids = tok.encode(TEXT)
    calls = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda xs: calls.append(len(xs)) or decode(xs))
    s, deltas = stream_all(tok, ids, skip_ids=frozenset({tok.eos_id}), lazy=True)
    assert deltas[:-1] == [""] * len(ids) and deltas[-1] == s.text == TEXT.replace("<|end_of_text|>", "")
    assert len(calls) == 1
    # with stop strings a stream cannot wait: it checks every push
    s, deltas = stream_all(tok, tok.encode("The answer is 4. More text after"), stop=("4. M",), lazy=True)
    assert s.stopped and s.text == "The answer is " and not s.lazy


def test_stop_strings_cut_the_text_and_are_held_back(tok):
    ids = tok.encode("The answer is 4. More text after")
    s, deltas = stream_all(tok, ids, stop=("4. M",))
    assert s.stopped and s.text == "The answer is "
    assert all("4" not in d for d in deltas)  # "4" could start the stop string: never emitted


def test_split_reasoning():
    assert split_reasoning("<think>a b</think> answer") == ("a b", "answer")
    assert split_reasoning("<think>still thinking") == ("still thinking", "")
    assert split_reasoning("no think block") == ("", "no think block")


def test_streaming_split_equals_the_whole_split():
    text = "<think>step 1, step 2</think>\\nfinal <answer>4</answer>"
    sp = ReasoningSplitter()
    parts = [sp.push(text[i:i + 3]) for i in range(0, len(text), 3)]
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == split_reasoning(text)


@pytest.mark.parametrize("text, want", [("step 1</think>\n\nIt is <answer>4</answer>", ("step 1", "It is <answer>4</answer>")),
                                        ("still thinking", ("still thinking", "")), ("</think>x", ("", "x"))])
def test_a_think_block_opened_by_the_prompt(text, want):
    """R1's template opens `<think>\\n` in the prompt: the completion continues the reasoning, whole or streamed."""
    opened = "<think>\n"
    whole = split_reasoning(text, opened)
    assert whole == want
    sp = ReasoningSplitter(opened)
    parts = [sp.push(text[i:i + 2]) for i in range(0, len(text), 2)]
    assert ("".join(r for r, _ in parts), "".join(c for _, c in parts)) == whole
    assert split_reasoning(text) == ("", text)  # without the opener it would all be answer


def test_readable_drops_answer_tags_and_holds_back_partial_ones():
    assert readable("It is <answer>4</answer>.") == "It is 4."
    text = "x <answer>12</answer>"
    streamed = [readable(text[:k], final=False) for k in range(len(text) + 1)]
    assert all(b.startswith(a) for a, b in zip(streamed, streamed[1:]))  # never takes back shown text
    assert "<" not in "".join(streamed) and readable(text) == "x 12"
    assert readable("a <ans", final=False) == "a " and readable("a <ans") == "a <ans"
