"""The server under hostile and careless traffic: extreme sampling values, huge bodies, clients that leave,
deadlines, SIGTERM, and what /health and /metrics report. Every request must end with an answer and leave
nothing in flight."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from nanoseek.infer.access import exposure_warning
from tests.conftest import tiny_model
from tests.infer.conftest import HI, NAME, live_server, wait_idle


@pytest.fixture(scope="module")
def served(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4, max_concurrent=16,
                     max_body_bytes=1 << 20) as s:
        yield s


@pytest.fixture(scope="module")
def url(served):
    return served[0]


def post(url, path, body, timeout=60, **kw):
    return httpx.post(f"{url}/v1/{path}", json=body, timeout=timeout, **kw)


EXTREMES = {  # valid but extreme sampling values: each must get an answer
    "temperature 1e-60": dict(temperature=1e-60, n=8),
    "temperature 1e-300 top_p 1e-30": dict(temperature=1e-300, top_p=1e-30),
    "top_p 1e-30": dict(temperature=1.0, top_p=1e-30, n=4),
    "top_k huge": dict(temperature=2.0, top_k=10**18, n=4),
    "top_k 1": dict(temperature=2.0, top_k=1),
    "temperature 2, largest seed": dict(temperature=2.0, seed=2**63 - 1, n=8),
    "smallest seed": dict(temperature=0.7, seed=-(2**63)),
}


@pytest.mark.parametrize("path", ["completions", "chat/completions"])
def test_extreme_sampling_values_are_answered_and_tiny_temperatures_are_greedy(url, path):
    base = {"model": NAME, "max_tokens": 4, **({"prompt": "t"} if path == "completions" else {"messages": HI})}
    text = (lambda c: c["text"]) if path == "completions" else (lambda c: c["message"]["content"]
                                                                 + c["message"]["reasoning_content"])
    greedy = text(post(url, path, {**base, "temperature": 0}).json()["choices"][0])
    for name, extra in EXTREMES.items():
        r = post(url, path, {**base, **extra})
        assert r.status_code == 200, (name, r.text)
        choices = r.json()["choices"]
        assert len(choices) == extra.get("n", 1) and all(c["finish_reason"] in ("stop", "length") for c in choices)
        if extra.get("temperature", 1) < 1e-5 or extra.get("top_p", 1) < 1e-20 or extra.get("top_k") == 1:
            assert {text(c) for c in choices} == {greedy}, name  # the floor (or p, k) leaves only the argmax
    wait_idle(url)


def test_forty_extreme_requests_in_a_row_leave_the_server_answering(url):
    bodies = [{"model": NAME, "prompt": "t", "max_tokens": 4, **e} for e in EXTREMES.values()]
    statuses = [post(url, "completions", bodies[i % len(bodies)]).status_code for i in range(40)]
    assert statuses == [200] * 40
    wait_idle(url)
    assert post(url, "chat/completions", {"model": NAME, "messages": HI, "max_tokens": 2}).status_code == 200


def test_logits_with_inf_and_nan_still_sample(tokenizer):
    """NaN logits count as -inf and +inf as the largest float: sampling goes on, for every setting."""
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
        model.lm_head.weight[9] = 1e38  # +-inf logits for token 9
    with live_server(model, tokenizer) as (url, _):
        for extra in [dict(temperature=0), *EXTREMES.values()]:
            r = post(url, "completions", {"model": NAME, "prompt": "The quick", "max_tokens": 3, **extra})
            assert r.status_code == 200, r.text
        wait_idle(url)


def test_a_model_without_finite_logits_answers_500_with_the_reason(tokenizer):
    model = tiny_model(vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    with live_server(model, tokenizer) as (url, _):
        for stream in (False, True):
            r = post(url, "completions", {"model": NAME, "prompt": "a", "max_tokens": 3, "stream": stream})
            error = r.json()["error"] if not stream else json.loads(r.text.split("data: ")[1])["error"]
            assert "no finite logit" in error["message"] and error["code"] == "generation_failed"
        wait_idle(url)


def test_oversized_bodies_are_refused_at_once_and_others_are_not_held_up(served, url, monkeypatch):
    tok = served[1].state.worker.engine.tokenizer
    encoded = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda text, **kw: encoded.append(len(text)) or encode(text, **kw))
    alone = time.monotonic()
    assert post(url, "completions", {"model": NAME, "prompt": "1+1", "max_tokens": 2}).status_code == 200
    alone = time.monotonic() - alone
    results = {}

    def big(name, prompt):
        t0 = time.monotonic()
        r = post(url, "completions", {"model": NAME, "prompt": prompt, "max_tokens": 1})
        results[name] = (r.status_code, r.json()["error"]["code"], time.monotonic() - t0)

    threads = [threading.Thread(target=big, args=("20 MB", "1+" * 10_000_000)),
               threading.Thread(target=big, args=("900 kB", "1+" * 450_000))]
    for t in threads:
        t.start()
    small = time.monotonic()
    assert post(url, "completions", {"model": NAME, "prompt": "1+1", "max_tokens": 2}).status_code == 200
    small = time.monotonic() - small
    for t in threads:
        t.join()
    assert results["20 MB"][:2] == (413, "request_too_large")  # over max_body_bytes
    assert results["900 kB"][:2] == (400, "context_length_exceeded")  # under it, but its bytes prove it too long
    assert max(encoded) < 1000  # the long prompt was never tokenized
    assert results["20 MB"][2] < 5 and results["900 kB"][2] < 5 and small < alone + 5  # bounded, not a benchmark
    raw = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json",
                                                                                 "Transfer-Encoding": "chunked"})
    assert raw.status_code == 413  # no Content-Length: counted while read


def test_a_client_that_leaves_a_non_streamed_request_frees_its_slot(served, url, monkeypatch):
    engine, requests = served[1].state.worker.engine, []
    add = engine.add
    monkeypatch.setattr(engine, "add", lambda *a: requests.append(add(*a)) or requests[-1])
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: time.sleep(0.01) or step())  # 480 steps take > 4.8 s
    body = json.dumps({"model": NAME, "prompt": "Once upon a time", "max_tokens": 480, "temperature": 0}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while not requests or not requests[0].tokens:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    wait_idle(url)
    assert requests[0].finish_reason == "cancelled" and len(requests[0].tokens) < 480


def test_request_timeout_answers_408_and_frees_the_slot(tokenizer, monkeypatch):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, request_timeout=0.5) as (url, app):
        engine = app.state.worker.engine
        step = engine.step
        monkeypatch.setattr(engine, "step", lambda: time.sleep(0.05) or step())  # a slow engine
        body = {"model": NAME, "prompt": "Once", "max_tokens": 400}
        r = post(url, "completions", body)
        assert r.status_code == 408 and r.json()["error"]["code"] == "timeout"
        events = post(url, "completions", {**body, "stream": True}).text.split("data: ")
        assert json.loads(events[-2])["error"]["code"] == "timeout" and events[-1].strip() == "[DONE]"
        wait_idle(url, timeout=10)


def test_health_and_metrics(url):
    assert post(url, "chat/completions", {"model": NAME, "messages": HI, "max_tokens": 3}).status_code == 200
    assert post(url, "completions", {"model": NAME, "prompt": "a", "top_p": 0}).status_code == 400
    wait_idle(url)
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["engine_alive"] and health["in_flight"] == health["queued"] == 0
    metrics = httpx.get(f"{url}/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
              if line and not line.startswith("#")}
    assert values['nanoseek:http_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert values['nanoseek:http_requests_total{endpoint="/v1/completions",status="400"}'] >= 1
    assert values["nanoseek:time_to_first_token_seconds_count"] >= 1
    assert values["nanoseek:generation_tokens_total"] >= 3 and values["nanoseek:prompt_tokens_total"] >= 1
    assert values["nanoseek:time_per_output_token_seconds_count"] >= 2
    assert values["nanoseek:num_requests_in_flight"] == values["nanoseek:num_requests_running"] == 0


@pytest.mark.parametrize("host, key, warned", [("127.0.0.1", None, False), ("localhost", None, False),
                                               ("::1", None, False), ("0.0.0.0", None, True),
                                               ("192.0.2.1", None, True), ("0.0.0.0", "k", False)])
def test_exposure_warning(host, key, warned):
    assert (exposure_warning(host, key) is not None) == warned


@pytest.mark.slow
def test_sigterm_with_requests_in_flight_exits_0_within_10_s(tiny_run):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", str(tiny_run[0]), "--port", str(port),
                             "--shutdown-grace", "2", "--model-name", NAME], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()
            time.sleep(0.1)
        answers = []
        slow = [threading.Thread(target=lambda: answers.append(post(url, "completions", {
            "model": NAME, "prompt": "a", "max_tokens": 400, "stream": s}, timeout=30))) for s in (False, True)]
        for t in slow:
            t.start()
        while httpx.get(f"{url}/health").json()["in_flight"] < 2 and len(answers) < 2:
            time.sleep(0.01)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        assert time.monotonic() - t0 < 10
        for t in slow:
            t.join(10)
        assert len(answers) == 2  # each got an answer: finished within the grace, or ended with a 503
        for r in answers:
            assert r.status_code in (200, 503) and (r.status_code == 503 or r.text.endswith("data: [DONE]\n\n")
                                                    or r.json()["choices"][0]["finish_reason"]), r.text[-300:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_engine_thread_shows_in_health_and_ends_every_request(tokenizer, monkeypatch):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer) as (url, app):
        def die():
            raise SystemExit("injected: the engine thread dies")
        monkeypatch.setattr(app.state.worker.engine, "step", die)
        r = post(url, "completions", {"model": NAME, "prompt": "a", "max_tokens": 3})
        assert r.status_code == 500 and "died" in r.json()["error"]["message"]
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["status"] == "dead" and health.json()["in_flight"] == 0
        r = post(url, "completions", {"model": NAME, "prompt": "a", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"


def test_an_unexpected_error_is_a_500_in_openais_shape_and_the_server_goes_on(tokenizer, monkeypatch):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer) as (url, app):
        engine = app.state.worker.engine
        add = engine.add
        monkeypatch.setattr(engine, "add", lambda *a: (_ for _ in ()).throw(RuntimeError("injected bug")))
        r = post(url, "completions", {"model": NAME, "prompt": "a", "max_tokens": 2})
        assert r.status_code == 500 and "injected bug" in r.json()["error"]["message"]
        monkeypatch.setattr(engine, "add", add)
        assert post(url, "completions", {"model": NAME, "prompt": "a", "max_tokens": 2}).status_code == 200
        wait_idle(url)
