"""Shared by the serving tests: a live uvicorn server on a local port, and a small tokenizer."""

import contextlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from nanoseek.data.tokenizer import Tokenizer
from nanoseek.infer.server import ServeConfig, create_app

TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 30? <answer>42</answer>",
         "Hello, how are you today?", "Think step by step, then answer."]
NAME = "tiny"
HI = [{"role": "user", "content": "Hello"}]


@contextlib.contextmanager
def live_server(model, tokenizer, **cfg):
    """Serve create_app(...) with uvicorn in a thread on a free 127.0.0.1 port; yields (base_url, app)."""
    app = create_app(model, tokenizer, ServeConfig(**cfg), NAME)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="session")
def tokenizer():
    """A BPE tokenizer of 300 tokens trained on TEXTS (deterministic, shared read-only)."""
    return Tokenizer.train(iter(TEXTS * 20), vocab_size=300)


def wait_idle(url, timeout=5.0):
    deadline = time.monotonic() + timeout
    while (h := httpx.get(f"{url}/health").json())["running"] or h["in_flight"]:
        assert time.monotonic() < deadline, f"the engine did not free its rows: {h}"
        time.sleep(0.02)
