"""Schemathesis fuzzes the live server (uvicorn on a local port, real HTTP) from the OpenAPI schema it serves.

The run is schemathesis's own engine (what `schemathesis run` does: its coverage phase, then its fuzzing phase,
each with valid and invalid data), bounded by examples per operation and by time. A schema hook sends the
served model's name, so requests get past the 404 for unknown models and reach generation. It must show:
no 5xx response, no request without an answer (and no streamed answer cut short), nothing in flight at the
end, and a server that still answers an ordinary chat completion.

(Schemathesis's pytest loader `schemathesis.pytest.from_fixture` cannot run here: schemathesis 4.32 writes
`request.node._nodeid`, which pytest 9.2 no longer has; its eager `schema.parametrize()` would need the
schema at import time, before any server runs.)
"""

import collections
import json
import os
import time

import httpx
import pytest
import schemathesis
from schemathesis.engine import events, from_schema

from nanoseek.data.tokenizer import Tokenizer
from tests.conftest import tiny_model
from tests.infer.test_server import HI, NAME, TEXTS, live_server

SEED = int(os.environ.get("NANOSEEK_FUZZ_SEED", "0"))  # another seed explores other inputs
EXAMPLES = 50  # per operation in the fuzzing phase (valid and invalid data together)
BUDGET = 75.0  # seconds of fuzzing; past it the engine is stopped (a bound, not a failure)
CLIENT_TIMEOUT = 30  # seconds without an answer: a failure (the server's own request_timeout is 20: 408)
MAX_TOKENS = 16  # generation limits the hook puts on valid requests, so no example takes long
MAX_N = 4
OPERATIONS = {"GET /health", "GET /v1/models", "POST /v1/chat/completions", "POST /v1/completions",
              "POST /tokenize", "POST /detokenize"}


@pytest.fixture(scope="module")
def fuzz_url():
    tokenizer = Tokenizer.train(iter(TEXTS * 20), vocab_size=300)
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4, max_concurrent=8,
                     max_len=128, max_tokens_default=MAX_TOKENS, request_timeout=20) as (url, _):
        yield url


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_schema(url: str):
    """The live server's schema, with the run's bounds and a hook that sends the served model's name."""
    config = schemathesis.Config.from_dict({
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": EXAMPLES, "database": "none", "no-shrink": True},
        "phases": {"stateful": {"enabled": False}},
        # only the properties asked for: undocumented statuses (400, 404, 408, 413, 429) and response bodies
        # the schema does not describe are not failures here
        "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
        "continue-on-failure": True,
        "request-timeout": CLIENT_TIMEOUT,
        "max-stream-events": 1_000_000,  # read every stream to its end
        "cache": {"enabled": False},  # no .schemathesis/ directory, nothing carried from run to run
        "workers": 2,  # two operations at once: concurrent requests on the engine
    })
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)

    @schema.hook
    def map_case(context, case):
        """Send the served model's name and cap generation wherever a body is an object with a string model;
        other values (invalid ones included) go as generated."""
        body = case.body
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            body["model"] = NAME
            for key in ("max_tokens", "max_completion_tokens"):
                if _is_int(body.get(key)) and body[key] > MAX_TOKENS:
                    body[key] = MAX_TOKENS
            if _is_int(body.get("n")) and MAX_N < body["n"] <= 8:  # n > 8 is invalid (400): left as it is
                body["n"] = MAX_N
        return case

    return schema


def describe(interaction) -> str:
    """The request as sent (method, URL, body) and the answer, short."""
    request, response = interaction.request, interaction.response
    body = request.body.decode("utf-8", "replace") if request.body is not None else ""
    answer = "no answer" if response is None else f"{response.status_code} {response.text[:300]!r}"
    return f"{request.method} {request.uri}  {body[:600]!r}\n      -> {answer}"


def listing(name: str, found: dict, most: int = 3) -> str:
    """Problems grouped by operation and answer: count, then a few of the requests."""
    lines = [f"{sum(map(len, found.values()))} {name}:"]
    for (label, answer), items in found.items():
        lines.append(f"  {label} -> {answer}: {len(items)}")
        lines += [f"    {item}" for item in items[:most]]
    return "\n".join(lines)


def stream_events(text: str) -> list:
    """The JSON events of a server-sent event stream (not the final `[DONE]`)."""
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ") and line != "data: [DONE]"]


def wait_idle(url: str, timeout: float = 5.0) -> dict:
    """GET /health until nothing is in flight (the engine frees rows asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health", timeout=CLIENT_TIMEOUT).json()
        if not (health["in_flight"] or health["running"] or health["queued"]) or time.monotonic() > deadline:
            return health
        time.sleep(0.05)


@pytest.mark.slow
def test_schemathesis_finds_no_server_errors_hangs_or_leaks(fuzz_url):
    schema = load_schema(fuzz_url)
    statuses = collections.Counter()  # (operation, status or None for no answer)
    server_errors, unanswered, cut_short = (collections.defaultdict(list) for _ in range(3))
    errors, streams = [], 0
    stream = from_schema(schema).execute()
    start, finished = time.monotonic(), None
    for event in stream:
        if isinstance(event, events.ScenarioFinished):
            label = event.recorder.label
            for interaction in event.recorder.interactions.values():
                response = interaction.response
                statuses[label, None if response is None else response.status_code] += 1
                if response is None:
                    unanswered[label, "no answer"].append(describe(interaction))
                elif response.status_code >= 500:
                    server_errors[label, f"{response.status_code} {response.text[:120]}"].append(describe(interaction))
                elif "text/event-stream" in str(response.headers.get("content-type")):
                    streams += 1
                    # once the status line has gone out, a server error is an error event in the stream
                    failed = [e["error"] for e in stream_events(response.text) if "error" in e]
                    if any(error.get("type") == "server_error" for error in failed):
                        server_errors[label, f"streamed {failed[0]}"[:120]].append(describe(interaction))
                    elif response.stream_cut_short or not response.text.rstrip().endswith("data: [DONE]"):
                        cut_short[label, "stream cut short"].append(describe(interaction))
        elif isinstance(event, events.NonFatalError):
            errors.append(f"{event.label}: {event.info.title}: {event.info.message}")
        elif isinstance(event, events.FatalError):
            errors.append(f"engine: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            finished = event
        if time.monotonic() - start > BUDGET:
            stream.stop()
    elapsed = time.monotonic() - start
    print(f"\nfuzzed for {elapsed:.1f} s: {sum(statuses.values())} requests ({streams} streamed), seed {SEED}, "
          f"{finished and finished.stop_reason}")
    for (label, status), count in sorted(statuses.items(), key=lambda item: (item[0][0], item[0][1] or 0)):
        print(f"  {label} {status or 'no answer'}: {count}")

    problems = [listing(name, found) for name, found in (("responses with status 5xx", server_errors),
                                                         ("requests without an answer", unanswered),
                                                         ("streams cut short", cut_short)) if found]
    problems += [f"engine error: {error}" for error in errors]
    try:
        health = wait_idle(fuzz_url)
        if not (health["status"] == "ok" and health["in_flight"] == 0 and health["running"] == 0):
            problems.append(f"not idle after the fuzzing: {health}")
        r = httpx.post(f"{fuzz_url}/v1/chat/completions", json={"model": NAME, "messages": HI, "max_tokens": 4},
                       timeout=CLIENT_TIMEOUT)
        if r.status_code != 200 or r.json()["choices"][0]["finish_reason"] not in ("stop", "length"):
            problems.append(f"an ordinary chat completion after the fuzzing: {r.status_code} {r.text[:300]}")
    except httpx.HTTPError as exc:
        problems.append(f"the server after the fuzzing: {exc!r}")
    assert not problems, "\n".join(problems)
    tested = {label for label, _ in statuses}
    assert OPERATIONS <= tested, f"not fuzzed: {OPERATIONS - tested}"
    assert statuses["POST /v1/completions", 200] and streams, "the fuzzing did not reach generation"
