import json
import random

import pytest

from nanoseek.cli import main
from nanoseek.data.documents import iter_documents
from nanoseek.data.tasks import TASKS
from nanoseek.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from tests.data.conftest import MIXED_TEXT, write_jsonl

ROUND_TRIP = [
    "",
    "hello world",
    "  leading and trailing spaces  ",
    "深度求索：中文文本必须逐字节往返。",
    "emoji 😀🔥 family 👨‍👩‍👧 flag 🇯🇵 skin 👍🏽",
    "combining: e\u0301 a\u0308 \u1e9b\u0323 (not normalized to NFC)",
    "NUL\x00 and controls \x01\x02\x07\x1b[0m \x7f end",
    "invalid-looking: \xff\xfe \u00c3\u00a9 \ufffd \ufeffBOM \U0010ffff \ue000",
    "line\nbreaks\r\nand\ttabs\n\n\n",
    "special strings <|end_of_text|> <think>x</think> <answer>7</answer> <|user|>",
    "<|begin_of_text|><|begin_of_text|>",
    "digits 0123456789 ٣٤٥ ½ ² 3.14e-10 -42",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_round_trip_random_unicode(tokenizer):
    rng = random.Random(0)
    planes = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x2FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0xE000, 0xF8FF)]
    for _ in range(50):
        chars = []
        for _ in range(rng.randint(1, 40)):
            lo, hi = rng.choice(planes)
            chars.append(chr(rng.randint(lo, hi)))  # no surrogates: not valid in UTF-8 (or in Python str I/O)
        text = "".join(chars)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_special_tokens(tokenizer):
    ids = [tokenizer.token_to_id(s) for s in SPECIAL_TOKENS]
    assert ids == [0, 1, 2, 3, 4, 5]  # bos 0 / eos 1 match ModelConfig's defaults
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.chat_markers) == (0, 1, 1, (2, 3))
    assert tokenizer.stop_ids == {1}
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert tokenizer.encode(s) == [i]
        assert tokenizer.decode([i]) == s
    assert tokenizer.encode("a", bos=True, eos=True) == [0, *tokenizer.encode("a"), 1]
    assert tokenizer.special_ids == {0, 1, 2, 3}  # <think> (4) and </think> (5) are added, not special (R1)
    # <answer> is plain text (R1): never a special id, but learned as one merged token from the documents
    assert not set(tokenizer.encode("<answer>42</answer>")) & tokenizer.special_ids
    assert len(tokenizer.encode("<answer>")) == 1


def test_digits_are_single_tokens(tokenizer):
    assert len(tokenizer.encode("31415926")) == 8
    assert len(tokenizer.encode("347+586=")) == 8


def test_encode_batch_matches_encode(tokenizer):
    texts = ROUND_TRIP + MIXED_TEXT
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_chat_format(tokenizer):
    p = TASKS["add"].generate(3, 3)
    msgs = p.messages()
    assert tokenizer.render_chat(msgs) == "<|begin_of_text|>" + p.document + "<|end_of_text|>"
    assert tokenizer.template.document(msgs) == p.document
    ids = tokenizer.apply_chat(msgs)
    assert ids == tokenizer.encode(p.document, bos=True, eos=True)  # as documents are framed in the shards
    prompt = tokenizer.apply_chat(msgs[:1])
    assert prompt == [tokenizer.bos_id, 2, *tokenizer.encode(p.prompt), 3]  # <|user|> ... <|assistant|>
    assert ids[:len(prompt)] == prompt
    assert tokenizer.apply_chat(msgs[:1], add_generation_prompt=False) == prompt[:-1]
    with_reasoning = [msgs[0], {"role": "assistant", "content": "<answer>1</answer>", "reasoning": "1+0=1 c0"}]
    assert tokenizer.render_chat(with_reasoning).endswith("<|assistant|><think>1+0=1 c0</think><answer>1</answer><|end_of_text|>")


def test_system_messages_go_before_the_first_user_turn(tokenizer):
    render_chat = tokenizer.render_chat
    system = [{"role": "system", "content": "Be brief."}, {"role": "system", "content": "Answer in digits."}]
    turns = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
             {"role": "user", "content": "2+2?"}]
    assert render_chat(system + turns) == render_chat(
        [{"role": "user", "content": "Be brief.\n\nAnswer in digits.\n\n1+1?"}, *turns[1:]])


@pytest.mark.parametrize("messages, match", [
    ([{"role": "robot", "content": "x"}], "role='robot': allowed roles are"),
    ([{"role": "tool", "content": "x"}], "role tool is not one of system, user, assistant"),
    ([{"role": "system", "content": "x"}], "not followed by a user turn"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "x"}], "before the first user turn"),
    ([{"role": "system", "content": "x"}, {"role": "assistant", "content": "a"}], "followed by a user turn"),
    ([{"role": "user", "content": 3}], "must be a string"),
    ([], "non-empty list"),
])
def test_chat_errors(tokenizer, messages, match):
    """Bad roles and orders are refused, each with a message that says which rule."""
    with pytest.raises(ValueError, match=match):
        tokenizer.render_chat(messages)


def test_save_load_and_train_from_files(tokenizer, tmp_path):
    loaded = Tokenizer.load(tokenizer.path.parent)
    assert loaded.sha256 == tokenizer.sha256 and loaded.vocab_size == tokenizer.vocab_size
    assert loaded.encode(MIXED_TEXT[1]) == tokenizer.encode(MIXED_TEXT[1])
    f = write_jsonl(tmp_path / "a.jsonl", [{"body": t} for t in MIXED_TEXT * 3])
    tok = Tokenizer.train(iter_documents(f, "body"), 300, tmp_path / "tok")
    assert (tmp_path / "tok" / "tokenizer.json").is_file() and tok.vocab_size <= 300
    assert tok.decode(tok.encode(MIXED_TEXT[2])) == MIXED_TEXT[2]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 262"):
        Tokenizer.train(iter(["x"]), 100)
    with pytest.raises(ValueError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)
    out = tmp_path / "tok"
    args = ["tokenizer", "--input", str(tmp_path / "missing.txt"), "--vocab-size", "300", "--out", str(out)]
    assert main(args) == 2
    assert not out.exists()  # refused before training


def test_think_tags_survive_skipping_special_tokens(tokenizer, tmp_path):
    """As in DeepSeek-R1's tokenizer: a decoder that drops special tokens (TRL's completions) keeps the think
    tags, and transformers reads the saved files the same way."""
    transformers = pytest.importorskip("transformers")
    text = "<|assistant|><think>1+2=3</think><answer>3</answer><|end_of_text|>"
    ids = tokenizer.encode(text)
    assert ids[:2] == [3, 4] and 5 in ids
    assert tokenizer._tok.decode(ids, skip_special_tokens=True) == "<think>1+2=3</think><answer>3</answer>"
    tokenizer.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf(text, add_special_tokens=False)["input_ids"] == ids
    assert hf.decode(ids, skip_special_tokens=True) == "<think>1+2=3</think><answer>3</answer>"
    assert hf.decode(ids) == tokenizer.decode(ids) == text


def test_a_tokenizer_trained_with_special_think_tags_still_loads(tokenizer, tmp_path):
    """Tokenizers trained before made <think> / </think> special: same ids, same text, still nanoseek's own."""
    spec = json.loads(tokenizer._tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = True
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    old = Tokenizer.load(tmp_path)
    assert old.special_ids == {0, 1, 2, 3, 4, 5}
    text = "12+34= <think>a</think> <answer>46</answer>"
    assert old.encode(text) == tokenizer.encode(text) and old.decode(old.encode(text)) == text
    assert (old.bos_id, old.eos_id, old.chat_markers) == (0, 1, (2, 3))
    assert old.render_chat([{"role": "user", "content": "1+1="}]) == "<|begin_of_text|><|user|>1+1=<|assistant|>"
