"""A user's DeepSeek folder (a tiny random DeepseekV3ForCausalLM saved by transformers beside DeepSeek-V3's or
R1's published tokenizer files) through generation: the same prompt ids, greedy tokens and served text as
transformers."""

import json

import openai
import pytest
import torch

from nanoseek.cli import main
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from tests.conftest import make_deepseek_folder
from tests.infer.conftest import NAME, live_server

transformers = pytest.importorskip("transformers")

MESSAGES = [[{"role": "user", "content": "What is 2+2?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
             {"role": "assistant", "content": "<think>one and one</think>2"}, {"role": "user", "content": "And 2+2?"}]]


@pytest.fixture(scope="module", params=["v3", "r1"])
def folder(request, deepseek_folder, deepseek_r1_folder):
    return deepseek_folder if request.param == "v3" else deepseek_r1_folder


@pytest.fixture(scope="module")
def reference(folder):
    """transformers' model and tokenizer on the same folder, and greedy continuations of MESSAGES."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    out = []
    for messages in MESSAGES:
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)
        out.append((ids, gen[0, len(ids):].tolist()))
    return tok, out


@pytest.fixture(scope="module")
def ours(folder):
    return load_pretrained(folder, dtype="float32")


def test_greedy_generation_equals_transformers(ours, reference):
    tok, expected = reference
    engine = Engine(ours.model, ours.tokenizer)
    for messages, (ids, want) in zip(MESSAGES, expected):
        assert ours.tokenizer.apply_chat(messages) == ids
        r = engine.add(ids, SamplingParams(max_tokens=10, temperature=0))
        engine.run()
        assert r.tokens == want[:len(r.tokens)] and (len(r.tokens) == len(want) or r.tokens[-1] in r.stop_ids)


def test_served_chat_equals_transformers(ours, reference, folder):
    """The server's greedy chat completion is transformers' text; R1's template opened <think> in the prompt,
    so there the whole unfinished completion is reasoning_content."""
    tok, expected = reference
    with live_server(ours.model, ours.tokenizer) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        for messages, (_, want) in zip(MESSAGES, expected):
            r = client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=10)
            text = tok.decode([t for t in want if t != tok.eos_token_id])
            message = r.choices[0].message
            if folder.name.startswith("r1"):
                assert (message.reasoning_content, message.content) == (text, "")
            else:
                assert (message.reasoning_content, message.content) == ("", text)
            assert r.usage.prompt_tokens == len(expected[MESSAGES.index(messages)][0])


def test_generate_command_on_the_folder(folder, capsys):
    assert main(["generate", str(folder), "--prompt", "What is 2+2?", "--max-tokens", "4", "--json",
                 "--temperature", "0"]) == 0
    row = json.loads(capsys.readouterr().out.splitlines()[0])
    assert row["prompt_tokens"] > 0 and row["completion_tokens"] <= 4


def test_bad_folders_get_clear_errors(deepseek_folder, tmp_path, capsys):
    small = make_deepseek_folder(tmp_path / "small", "v3", dtype=torch.float32, vocab_size=512)
    with pytest.raises(ValueError, match=r"tokenizer.json has 128815 tokens but the model only 512"):
        load_pretrained(small)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors.index.json", *[p.name for p in deepseek_folder.glob("*.safetensors")]):
        (bare / name).write_bytes((deepseek_folder / name).read_bytes())
    assert main(["generate", str(bare), "--prompt", "x"]) == 2
    assert f"{bare} has no tokenizer.json: text generation needs one" in capsys.readouterr().err


def test_a_template_that_refuses_is_a_400_naming_it(deepseek_folder, tmp_path):
    pre = load_pretrained(deepseek_folder, dtype="float32")
    config = {**pre.tokenizer.config, "chat_template": "{% if messages[0]['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}{{ messages[0]['content'] }}"}
    (tmp_path / "tokenizer.json").write_bytes((deepseek_folder / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from nanoseek.data.tokenizer import Tokenizer

    with live_server(pre.model, Tokenizer.load(tmp_path)) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="refused the conversation: System role not supported"):
            client.chat.completions.create(model=NAME, max_tokens=2, messages=[
                {"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_eval_command_on_the_folder_with_a_gsm8k_file(deepseek_r1_folder, tmp_path, capsys):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i}"} for i in range(60)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    assert main(["eval", str(deepseek_r1_folder), "--task", str(tmp_path / "gsm8k.jsonl"), "--template", "boxed",
                 "--extractor", "boxed", "--n", "3", "--k", "2", "--max-tokens", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["overall"]["n"] == 3 and all(s["completion"].startswith("<think>\n") for s in report["samples"])
    for problem in report["problems"]:  # the gold is GSM8K's number after ####
        assert problem["answer"] == str(2 * int(problem["prompt"].split()[2]))
