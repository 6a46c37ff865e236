"""The OpenAI-compatible server, run for real (uvicorn on a local port) and driven with the `openai` client
and raw httpx requests, on a tiny random model with a small tokenizer."""

import contextlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from nanoseek.infer.engine import Engine, Update
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.server import ServeConfig
from tests.conftest import tiny_model
from tests.infer.conftest import HI, NAME, live_server, wait_idle


@pytest.fixture(scope="module")
def served(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4, max_concurrent=8) as s:
        yield s


@pytest.fixture(scope="module")
def url(served):
    return served[0]


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


def chat(client, messages=HI, **kw):
    """A greedy chat completion (12 tokens unless kw says otherwise)."""
    return client.chat.completions.create(**{"model": NAME, "messages": messages, "temperature": 0,
                                             "max_tokens": 12, **kw})


def script(engine, monkeypatch, pieces: list[str]):
    """Make the engine answer every request with `pieces`, one text delta per step (a model that reasons)."""
    def step():
        while not engine.inbox.empty():
            engine.waiting.append(engine.inbox.get())
        r = engine.waiting[0]
        r.tokens.append(0)
        if len(r.tokens) == len(pieces):
            r.finish_reason = "stop"
            engine.waiting.popleft()
        return [Update(r, [0], pieces[len(r.tokens) - 1])]
    monkeypatch.setattr(engine, "step", step)


REASONING = ["<think>", "Two and", " two.", "</think>", " It is", " 4."]


def test_models_and_health(client, url):
    assert [m.id for m in client.models.list()] == [NAME]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["running"] == 0


def test_chat_streamed_equals_non_streamed(client, tokenizer):
    full = chat(client)
    message, choice = full.choices[0].message, full.choices[0]
    assert choice.finish_reason in ("stop", "length") and message.role == "assistant"
    assert full.usage.prompt_tokens == len(tokenizer.apply_chat(HI))
    assert 1 <= full.usage.completion_tokens <= 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    reasoning, content, finish, usage = [], [], [], None
    for chunk in chat(client, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning.append(getattr(c.delta, "reasoning_content", None) or "")
            content.append(c.delta.content or "")
            finish.append(c.finish_reason)
    assert "".join(content) == message.content and "".join(reasoning) == message.reasoning_content
    assert message.content + message.reasoning_content  # some text came out
    assert finish[-1] == choice.finish_reason and not any(finish[:-1])
    assert usage == full.usage


def test_reasoning_is_split_from_the_answer(served, client, monkeypatch):
    script(served[1].state.worker.engine, monkeypatch, REASONING)
    message = chat(client).choices[0].message
    assert (message.reasoning_content, message.content) == ("Two and two.", "It is 4.")
    deltas = [c.choices[0].delta for c in chat(client, stream=True)]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "Two and two."
    assert "".join(d.content or "" for d in deltas) == "It is 4."
    raw = client.completions.create(model=NAME, prompt="2 + 2?", max_tokens=12)
    assert raw.choices[0].text == "".join(REASONING)  # text completions are not split


def test_completions_match_the_engine(client, tokenizer):
    """The served text is what the engine gives for the same prompt (with the training documents' bos)."""
    reference = Engine(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer)
    request = reference.add(tokenizer.encode("The quick brown", bos=True), SamplingParams(max_tokens=16))
    reference.run()
    out = client.completions.create(model=NAME, prompt="The quick brown", temperature=0, max_tokens=16)
    assert out.choices[0].text == request.text and out.choices[0].finish_reason == request.finish_reason
    streamed = client.completions.create(model=NAME, prompt="The quick brown", temperature=0, max_tokens=16,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == request.text


def test_concurrent_clients_match_sequential(client):
    conversations = [[{"role": "user", "content": f"Question {i}: what is {i} + {i}?"}] for i in range(6)]
    answer = lambda m: chat(client, m).choices[0].message.model_dump()  # noqa: E731
    alone = [answer(m) for m in conversations]
    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(answer, conversations)) == alone


def test_n_choices(client):
    greedy = chat(client, n=2)
    assert [c.index for c in greedy.choices] == [0, 1]
    assert greedy.choices[0].message == greedy.choices[1].message
    kw = dict(model=NAME, messages=HI, n=2, temperature=1.0, seed=3, max_tokens=12)
    sampled = client.chat.completions.create(**kw)
    texts = [c.message.content + c.message.reasoning_content for c in sampled.choices]
    assert texts[0] != texts[1]  # choice i samples with seed + i
    assert texts == [c.message.content + c.message.reasoning_content
                     for c in client.chat.completions.create(**kw).choices]  # seeded: reproducible
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += (c.delta.content or "") + (getattr(c.delta, "reasoning_content", None) or "")
    assert sorted(streamed) == sorted(texts)


LONG = " ".join(["fox"] * 600)
BAD = {  # id: (path, json body or raw bytes, status, param, words the message must contain)
    "malformed json": ("chat/completions", b'{"model": "tiny", "messages": [', 400, None, ["JSON"]),
    "not an object": ("chat/completions", [1, 2], 400, None, []),
    "no messages": ("chat/completions", {"model": NAME}, 400, "messages", ["messages"]),
    "no model": ("chat/completions", {"messages": HI}, 400, "model", ["model"]),
    "wrong type": ("chat/completions", {"model": NAME, "messages": HI, "temperature": "hot"}, 400, "temperature",
                   ["temperature", "hot"]),
    "bad role": ("chat/completions", {"model": NAME, "messages": [{"role": "tool", "content": "x"}, *HI]}, 400,
                 "messages", ["tool", "system", "user"]),
    "late system": ("chat/completions", {"model": NAME, "messages": [*HI, {"role": "assistant", "content": "a"},
                    {"role": "system", "content": "x"}, *HI]}, 400, "messages", ["system message"]),
    "tools": ("chat/completions", {"model": NAME, "messages": HI, "tools": [{"type": "function"}]}, 400, "tools",
              ["tools", "not supported"]),
    "response_format": ("chat/completions", {"model": NAME, "messages": HI, "response_format": {
                        "type": "json_object"}}, 400, "response_format", ["response_format"]),
    "logit_bias": ("completions", {"model": NAME, "prompt": "a", "logit_bias": {"5": 3}}, 400, "logit_bias",
                   ["logit_bias"]),
    "image part": ("chat/completions", {"model": NAME, "messages": [{"role": "user", "content": [
                   {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages", ["image_url", "text"]),
    "top_logprobs alone": ("chat/completions", {"model": NAME, "messages": HI, "top_logprobs": 2}, 400,
                           "top_logprobs", ["logprobs"]),
    "token id": ("completions", {"model": NAME, "prompt": [1, 2, 10**12]}, 400, "prompt", ["vocabulary"]),
    "empty prompt list": ("completions", {"model": NAME, "prompt": []}, 400, "prompt", ["empty"]),
    "n too large": ("chat/completions", {"model": NAME, "messages": HI, "n": 9}, 400, "n", ["n", "8"]),
    "temperature": ("chat/completions", {"model": NAME, "messages": HI, "temperature": 2.5}, 400, "temperature",
                    ["2"]),
    "top_p": ("completions", {"model": NAME, "prompt": "a", "top_p": 0}, 400, "top_p", ["top_p"]),
    "max_tokens < 1": ("completions", {"model": NAME, "prompt": "a", "max_tokens": 0}, 400, "max_tokens",
                       ["max_tokens"]),
    "empty stop": ("completions", {"model": NAME, "prompt": "a", "stop": [""]}, 400, "stop", ["stop"]),
    "unknown model": ("chat/completions", {"model": "gpt-4", "messages": HI}, 404, "model", ["gpt-4", NAME]),
    "prompt too long": ("completions", {"model": NAME, "prompt": LONG, "max_tokens": 4}, 400, "prompt",
                        ["tokens) + max_tokens (4)", "512"]),
    "max_tokens too large": ("chat/completions", {"model": NAME, "messages": HI, "max_tokens": 10_000}, 400,
                             "messages", ["max_tokens (10000)", "512"]),
    "unknown path": ("chat/complete", {}, 404, None, []),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(url, client, case):
    path, body, status, param, words = case
    raw = isinstance(body, bytes)
    r = httpx.post(f"{url}/v1/{path}", **dict(content=body, headers={"Content-Type": "application/json"}) if raw
                   else dict(json=body))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert all(w in error["message"] for w in words), error["message"]
    assert chat(client, max_tokens=2).choices[0].finish_reason in ("stop", "length")


def test_api_key(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, api_key="secret") as (url, _):
        for key in ("wrong", None):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": HI}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", max_retries=0)
        assert chat(good, max_tokens=2).choices[0].message.role == "assistant"
        assert httpx.get(f"{url}/health").status_code == 200  # open to health checks


def open_stream(url, **body):
    """A long streamed completion, opened and read up to its first chunk; the caller closes it."""
    stack = contextlib.ExitStack()
    http = stack.enter_context(httpx.Client(timeout=30))
    response = stack.enter_context(http.stream("POST", f"{url}/v1/completions", json=dict(
        model=NAME, prompt="Once upon a time", max_tokens=480, temperature=0, stream=True, **body)))
    assert response.status_code == 200
    lines = response.iter_lines()
    stack.callback(lines.close)  # holds the iterator: dropping it would close the connection
    assert next(lines).startswith("data: {")
    return stack


def test_too_many_requests(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_concurrent=1) as (url, _):
        with open_stream(url):
            r = httpx.post(f"{url}/v1/chat/completions", json={"model": NAME, "messages": HI})
            assert r.status_code == 429 and "max_concurrent=1" in r.json()["error"]["message"]
        wait_idle(url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert chat(client, max_tokens=2).choices[0].message.role == "assistant"


def test_disconnect_cancels_the_request_and_frees_its_row(served, monkeypatch):
    url, app = served
    engine, requests = app.state.worker.engine, []
    add = engine.add
    monkeypatch.setattr(engine, "add", lambda *a: requests.append(add(*a)) or requests[-1])
    open_stream(url).close()
    wait_idle(url)
    assert [r.finish_reason for r in requests] == ["cancelled"] and len(requests[0].tokens) < 480


def test_failed_engine_step_answers_500_and_the_server_keeps_serving(served, client, monkeypatch):
    engine = served[1].state.worker.engine
    monkeypatch.setattr(engine, "step", lambda: 1 / 0)
    with pytest.raises(openai.InternalServerError, match="generation failed"):
        chat(client)
    monkeypatch.undo()
    wait_idle(served[0])
    assert chat(client).choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("field,value", [("port", 0), ("max_concurrent", 0), ("max_batch", 0), ("api_key", ""),
                                         ("max_tokens_default", 0), ("max_len", 1), ("model_name", "")])
def test_serve_config_validates(field, value):
    with pytest.raises(ValueError, match=field):
        ServeConfig(**{field: value})
