"""The OpenAI dialect that clients and evaluation harnesses use: log-probs (chat and completions, echo,
streamed and not) equal to the full forward's, token-id and batched prompts, system messages, content parts,
max_completion_tokens, and vLLM's tokenizer endpoints."""

import httpx
import pytest
import torch

from nanoseek.infer.engine import generate
from nanoseek.infer.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.infer.conftest import HI, NAME, live_server


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(vocab_size=tokenizer.vocab_size)


@pytest.fixture(scope="module")
def url(model, tokenizer):
    with live_server(model, tokenizer, max_batch=4) as (url, _):
        yield url


def post(url, path, body):
    r = httpx.post(f"{url}/{path}", json={"model": NAME, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r


def events(r):
    return [httpx.Response(200, content=line[6:]).json() for line in r.text.split("\n")
            if line.startswith("data: {")]


def full_logprobs(model, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, from one full forward."""
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


def greedy_ids(model, tokenizer, prompt, n):
    out = generate(model, [prompt], SamplingParams(max_tokens=n), stop_ids=(tokenizer.eos_id,))[0]
    return [t for t in out if t != tokenizer.eos_id]


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_equal_the_full_forward(url, model, tokenizer, stream):
    r = post(url, "v1/chat/completions", {"messages": HI, "max_tokens": 10, "temperature": 0, "logprobs": True,
                                          "top_logprobs": 3, "stream": stream})
    if stream:
        content = [x for e in events(r) for c in e["choices"] if c["logprobs"] for x in c["logprobs"]["content"]]
    else:
        content = r.json()["choices"][0]["logprobs"]["content"]
    prompt = tokenizer.apply_chat(HI)
    gen = greedy_ids(model, tokenizer, prompt, 10)
    want = full_logprobs(model, prompt + gen)[len(prompt) - 1:]
    assert len(content) == len(gen)
    torch.testing.assert_close(torch.tensor([c["logprob"] for c in content]), torch.tensor(want), atol=1e-4, rtol=0)
    for c, t in zip(content, gen):
        assert len(c["top_logprobs"]) == 3 and c["top_logprobs"][0]["logprob"] == c["logprob"]  # greedy: the top
        assert bytes(c["bytes"]) == tokenizer.token_bytes(t)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_echo_logprobs_cover_prompt_and_completion(url, model, tokenizer, stream):
    r = post(url, "v1/completions", {"prompt": "The quick brown", "max_tokens": 6, "temperature": 0,
                                     "logprobs": 2, "echo": True, "stream": stream})
    if stream:
        pieces = [c for e in events(r) for c in e["choices"]]
        text = "".join(c["text"] for c in pieces)
        lps = {k: [x for c in pieces if c["logprobs"] for x in c["logprobs"][k]]
               for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    else:
        choice = r.json()["choices"][0]
        text, lps = choice["text"], choice["logprobs"]
    prompt = tokenizer.encode("The quick brown", bos=True)
    gen = greedy_ids(model, tokenizer, prompt, 6)
    assert text.startswith("The quick brown") and lps["token_logprobs"][0] is None
    assert len(lps["tokens"]) == len(prompt) + len(gen) and lps["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(lps["token_logprobs"][1:]), torch.tensor(full_logprobs(
        model, prompt + gen)), atol=1e-4, rtol=0)
    assert all(len(top) <= 2 and max(top.values()) >= lp for top, lp in zip(lps["top_logprobs"][1:],
                                                                         lps["token_logprobs"][1:]))
    assert lps["text_offset"] == sorted(lps["text_offset"])


def test_token_id_prompts_batch_and_n(url, model):
    prompts = [[5, 6, 7], [100, 101]]
    r = post(url, "v1/completions", {"prompt": prompts, "n": 2, "max_tokens": 4, "temperature": 0, "logprobs": 0})
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, p in enumerate(prompts):  # token ids are used verbatim: no BOS
        want = generate(model, [p], SamplingParams(max_tokens=4))[0]
        for c in choices[2 * i: 2 * i + 2]:
            assert len(c["logprobs"]["tokens"]) == len(want)
            torch.testing.assert_close(torch.tensor(c["logprobs"]["token_logprobs"]),
                                       torch.tensor(full_logprobs(model, p + want)[len(p) - 1:]), atol=1e-4, rtol=0)
    assert r.json()["usage"]["prompt_tokens"] == 5


def test_system_messages_content_parts_and_max_completion_tokens(url, tokenizer):
    system = [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Digits only."}]
    r = post(url, "v1/chat/completions", {"messages": system + HI, "max_tokens": 2})
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer.apply_chat(
        [{"role": "user", "content": "Be brief.\n\nDigits only.\n\nHello"}]))
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "2+2?"}]}]
    joined = [{"role": "user", "content": "What is\n2+2?"}]
    a = post(url, "v1/chat/completions", {"messages": parts, "max_tokens": 6, "temperature": 0}).json()
    b = post(url, "v1/chat/completions", {"messages": joined, "max_tokens": 6, "temperature": 0}).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"] and a["usage"] == b["usage"]
    r = post(url, "v1/chat/completions", {"messages": HI, "max_completion_tokens": 3, "max_tokens": 50,
                                          "temperature": 0}).json()
    assert r["usage"]["completion_tokens"] <= 3


def test_tokenizer_endpoints(url, tokenizer):
    text = "What is 12 + 30? 二加二"
    ids = post(url, "tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert ids["tokens"] == tokenizer.encode(text) and ids["count"] == len(ids["tokens"])
    assert post(url, "tokenize", {"prompt": text}).json()["tokens"] == tokenizer.encode(text, bos=True)
    assert post(url, "tokenize", {"messages": HI}).json()["tokens"] == tokenizer.apply_chat(HI)
    assert post(url, "detokenize", {"tokens": ids["tokens"]}).json()["prompt"] == text
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] == "<|end_of_text|>" and "{{ bos_token }}" in info["chat_template"]
    bad = httpx.post(f"{url}/detokenize", json={"tokens": [1, 10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_0_with_echo_scores_the_prompt_only(url, model, tokenizer, stream):
    """OpenAI's legacy scoring call (max_tokens=0, echo, logprobs), as older harnesses send it."""
    r = post(url, "v1/completions", {"prompt": "The quick brown", "max_tokens": 0, "echo": True, "logprobs": 1,
                                     "stream": stream, "stream_options": {"include_usage": True} if stream else None})
    if stream:
        chunks = events(r)
        pieces = [c for e in chunks for c in e["choices"]]
        text = "".join(c["text"] for c in pieces)
        lps = [x for c in pieces if c["logprobs"] for x in c["logprobs"]["token_logprobs"]]
        finish, used = pieces[-1]["finish_reason"], chunks[-1]["usage"]
    else:
        choice = r.json()["choices"][0]
        text, lps, finish, used = choice["text"], choice["logprobs"]["token_logprobs"], choice["finish_reason"], \
            r.json()["usage"]
    prompt = tokenizer.encode("The quick brown", bos=True)
    assert text == "The quick brown" and finish == "length" and used["completion_tokens"] == 0
    assert lps[0] is None and len(lps) == len(prompt)
    torch.testing.assert_close(torch.tensor(lps[1:]), torch.tensor(full_logprobs(model, prompt)), atol=1e-4, rtol=0)
    bad = httpx.post(f"{url}/v1/completions", json={"model": NAME, "prompt": "a", "max_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
