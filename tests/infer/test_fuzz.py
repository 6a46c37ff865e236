"""Schemathesis fuzzes the live server (uvicorn on a local port, real HTTP, an API key) from the OpenAPI schema
it serves, with all its checks: the answers conform to the schema (status, content type, headers, body, each
streamed event), schema-invalid bodies are refused, schema-valid ones accepted, 405s carry Allow, and the key
is enforced.

The run is schemathesis's own engine, what `schemathesis run` does: its coverage phase, then its fuzzing phase,
each with valid and invalid data, bounded by examples per operation and by time. A schema hook sends the
served model's name, so requests get past the 404 for unknown models and reach generation, and caps what one
example may generate. Meanwhile a bystander client streams ordinary chat completions, so fuzzed requests share
the engine's batch with requests in flight. The run must show: no check failure, no response with status 5xx
(nor a streamed server error), no request without an answer, no stream cut short, nothing in flight at the
end, and a server that still answers an ordinary chat completion.

Schemathesis's pytest loader `schemathesis.pytest.from_fixture` cannot run here (schemathesis 4.32 sets
`request.node._nodeid`, which pytest 9.2 no longer has), and its eager `schema.parametrize()` needs the schema
at import time, before any server runs: hence the engine, inside one test.
"""

import collections
import json
import os
import threading
import time

import httpx
import pytest
import schemathesis
from schemathesis.engine import events, from_schema
from schemathesis.engine.recorder import Status
from schemathesis.openapi.checks import RejectedPositiveData

from tests.conftest import tiny_model
from tests.infer.conftest import HI, NAME, live_server

SEED = int(os.environ.get("NANOSEEK_FUZZ_SEED", "0"))  # another seed explores other inputs
EXAMPLES = 30  # per operation and generation mode (valid, invalid) in the fuzzing phase
BUDGET = 75.0  # seconds of fuzzing; past it the engine is stopped (a bound, not a failure)
CLIENT_TIMEOUT = 30  # seconds without an answer: a failure (past the server's request_timeout=20 it answers 408)
MAX_TOKENS = 16  # what the hook leaves a valid request to generate, so no example takes long
MAX_N = 4
KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# what a schema-valid body may still be refused for (400), as JSON Schema cannot state it: the prompt's length
# in tokens, and the order of a conversation's roles (the last one, and what the chat template refuses)
UNSTATED = {"context_length_exceeded", "invalid_conversation"}
OPERATIONS = {"GET /health", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
              "POST /tokenize", "POST /detokenize"}


@pytest.fixture(scope="module")
def fuzz_url(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4, max_concurrent=8,
                     max_len=128, max_tokens_default=MAX_TOKENS, request_timeout=20, api_key=KEY) as (url, _):
        yield url


def _is_int(value) -> bool:
    """JSON Schema's integer (2 or 2.0), as the server reads it."""
    return not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer())


def load_schema(url: str):
    """The live server's schema, with the run's bounds and a hook that sends the served model's name."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none", "no-shrink": True},
        "phases": {"stateful": {"enabled": False}},
        "checks": {"enabled": True},
        "auth": {"openapi": {"HTTPBearer": {"bearer": KEY}}},
        "continue-on-failure": True,
        "request-timeout": CLIENT_TIMEOUT,
        "max-stream-events": 1_000_000,  # read every stream to its end
        "cache": {"enabled": False},  # no .schemathesis/ directory, nothing carried from one run to the next
        # one operation at a time: hypothesis generating in two threads at once trips CPython 3.11's parser
        # ("SystemError: AST constructor recursion depth mismatch"); the bystander brings the concurrency
        "workers": 1,
    })
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)

    @schema.hook
    def map_case(context, case):
        """Where the body is an object with a string `model`: the served model's name, and at most MAX_TOKENS
        tokens and MAX_N choices (a valid body stays valid). Other bodies, and invalid values of these fields,
        go as generated."""
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            body["model"] = NAME
            for key in ("max_tokens", "max_completion_tokens"):
                if _is_int(body.get(key)) and body[key] > MAX_TOKENS:
                    body[key] = MAX_TOKENS
            if _is_int(body.get("n")) and MAX_N < body["n"] <= 8:  # n > 8 is invalid (400): left as it is
                if body.get("best_of") == body["n"]:  # best_of must equal n
                    body["best_of"] = MAX_N
                body["n"] = MAX_N
        return case

    @schema.hook
    def filter_failure(context, failure, case, response):
        """Keep every failure but a schema-valid body refused for a rule the schema cannot state (UNSTATED)."""
        if not (isinstance(failure, RejectedPositiveData) and response.status_code == 400):
            return True
        try:
            return response.json()["error"]["code"] not in UNSTATED
        except (ValueError, KeyError, TypeError):
            return True

    return schema


def problem(status: int | None, content_type: str, text: str, cut_short: bool = False) -> str | None:
    """What is wrong with an answer, if anything: none, a 5xx, a server error event in a stream (the status line
    had gone out), or a stream that did not run to its `data: [DONE]`."""
    if status is None:
        return "no answer"
    if status >= 500:
        return f"{status} {text[:120]}"
    if "text/event-stream" in content_type:
        try:
            events_ = [json.loads(line[6:]) for line in text.splitlines()
                       if line.startswith("data: ") and line != "data: [DONE]"]
        except json.JSONDecodeError as exc:
            return f"a stream event that is not JSON: {exc}"
        failed = [e["error"] for e in events_ if isinstance(e, dict) and "error" in e]
        if any(error.get("type") == "server_error" for error in failed):
            return f"streamed error {json.dumps(failed[0])[:120]}"
        if cut_short or not text.rstrip().endswith("data: [DONE]"):
            return "stream cut short"
    return None


def describe(method: str, url: str, body: bytes | None, status: int | None, text: str) -> str:
    """The request as sent and the answer, short enough to read in a list."""
    sent = body.decode("utf-8", "replace") if body is not None else ""
    answer = f"no answer {text[:200]}" if status is None else f"{status} {text[:300]!r}"
    return f"{method} {url}  {sent[:600]!r}\n      -> {answer}"


def bystander(url: str, stop: threading.Event, answers: list) -> None:
    """Stream ordinary chat completions, each read to its end, until `stop`; log (status, content type, text)."""
    body = {"model": NAME, "messages": HI, "max_tokens": MAX_TOKENS, "stream": True}
    with httpx.Client(timeout=CLIENT_TIMEOUT, headers=AUTH) as http:
        while not stop.is_set():
            try:
                with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    answers.append((r.status_code, r.headers.get("content-type", ""), r.read().decode()))
            except httpx.HTTPError as exc:
                answers.append((None, "", repr(exc)))
            stop.wait(0.2)


def wait_idle(url: str, timeout: float = 5.0) -> dict:
    """GET /health until nothing is in flight (the engine frees rows asynchronously) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health", timeout=CLIENT_TIMEOUT).json()
        if not (health["in_flight"] or health["running"] or health["queued"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def failures(recorder) -> list[tuple[str, str]]:
    """(kind, details) of each failed or errored check in a scenario: its request and answer."""
    out = []
    for case_id, nodes in recorder.checks.items():
        interaction = recorder.interactions.get(case_id)
        request, response = (interaction.request, interaction.response) if interaction else (None, None)
        sent = "" if request is None else describe(request.method, request.uri, request.body,
                                                   response and response.status_code, response and response.text or "")
        for node in nodes:
            if node.status == Status.FAILURE:
                failure = node.failure_info.failure
                out.append((f"{node.name}: {failure.title}", f"{failure.message[:400]!r}\n      {sent}"))
            elif node.status == Status.ERROR:
                out.append((f"{node.name}: the check raised", sent))
    return out


@pytest.mark.slow
def test_schemathesis_finds_no_failure_hang_or_leak(fuzz_url):
    schema = load_schema(fuzz_url)
    statuses = collections.Counter()  # (operation, status; None: no answer)
    found = collections.defaultdict(list)  # (operation, problem) -> requests
    errors, streams = [], 0
    stop, answers = threading.Event(), []
    thread = threading.Thread(target=bystander, args=(fuzz_url, stop, answers), daemon=True)
    thread.start()
    run = from_schema(schema).execute()
    start, finished = time.monotonic(), None
    budget = threading.Timer(BUDGET, run.stop)  # also within an operation's scenario, which can take long
    budget.start()
    try:
        for event in run:
            if isinstance(event, events.ScenarioFinished):
                label = event.recorder.label
                for kind, details in failures(event.recorder):
                    found[label, kind].append(details)
                for interaction in event.recorder.interactions.values():
                    request, response = interaction.request, interaction.response
                    status = None if response is None else response.status_code
                    statuses[label, status] += 1
                    text = "" if response is None else response.text
                    content_type = "" if response is None else str(response.headers.get("content-type"))
                    streams += "text/event-stream" in content_type
                    if (kind := problem(status, content_type, text, response and response.stream_cut_short)):
                        found[label, kind].append(describe(request.method, request.uri, request.body, status, text))
            elif isinstance(event, events.NonFatalError):  # a network error, or one in the engine or the hook
                errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
            elif isinstance(event, events.FatalError):
                errors.append(f"engine: {event.exception!r}")
            elif isinstance(event, events.EngineFinished):
                finished = event
    finally:
        budget.cancel()
        stop.set()
        thread.join(CLIENT_TIMEOUT + 5)
    elapsed = time.monotonic() - start
    for status, content_type, text in answers:
        statuses["bystander chat stream", status] += 1
        if (kind := problem(status, content_type, text)):
            found["bystander chat stream", kind].append(describe("POST", "/v1/chat/completions", None, status, text))

    print(f"\nfuzzed for {elapsed:.1f} s: {sum(statuses.values())} requests ({streams} fuzzed streams, "
          f"{len(answers)} bystander streams), seed {SEED}, {finished and finished.stop_reason}")
    for (label, status), count in sorted(statuses.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        print(f"  {label} {status or 'no answer'}: {count}")

    problems = [f"{len(items)} x {label} -> {kind}:" + "".join(f"\n    {item}" for item in items[:3])
                for (label, kind), items in found.items()]
    problems += [f"engine error: {error}" for error in errors]
    try:
        health = wait_idle(fuzz_url)
        if not (health["status"] == "ok" and health["in_flight"] == 0 and health["running"] == 0):
            problems.append(f"not idle after the fuzzing: {health}")
        r = httpx.post(f"{fuzz_url}/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 4},
                       headers=AUTH, timeout=CLIENT_TIMEOUT)
        if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            problems.append(f"an ordinary chat completion after the fuzzing: {r.status_code} {r.text[:300]}")
    except httpx.HTTPError as exc:
        problems.append(f"the server after the fuzzing: {exc!r}")
    assert not problems, "\n".join(problems)
    tested = {label for label, _ in statuses}
    assert OPERATIONS <= tested, f"not fuzzed: {OPERATIONS - tested}"
    # generation was reached (fuzzed streams depend on the examples drawn and on the time budget: the bystander
    # streams throughout)
    assert statuses["POST /v1/completions", 200] and statuses["POST /v1/chat/completions", 200], \
        "the fuzzing did not reach generation"
    assert not thread.is_alive() and statuses["bystander chat stream", 200], "the bystander did not stream"
