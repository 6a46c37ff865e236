"""Prometheus metrics of the server (GET /metrics), named after vLLM's where they mean the same.

Each app has its own registry, so two servers in one process (the tests) never share counts. Gauges of the
engine's state are read when scraped.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics:
    def __init__(self, running: Callable[[], int], queued: Callable[[], int], in_flight: Callable[[], int]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("nanoseek:http_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("nanoseek:request_success", "Engine requests finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("nanoseek:prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("nanoseek:generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("nanoseek:time_to_first_token_seconds", "From arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("nanoseek:time_per_output_token_seconds", "Between a request's successive tokens",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("nanoseek:e2e_request_latency_seconds", "From arrival to the last token",
                             buckets=E2E_BUCKETS, registry=r)
        for name, doc, read in (("num_requests_running", "Engine rows decoding", running),
                                ("num_requests_waiting", "Requests waiting for a row", queued),
                                ("num_requests_in_flight", "Requests admitted and not yet answered", in_flight)):
            Gauge(f"nanoseek:{name}", doc, registry=r).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Timer:
    """One engine request's token timings: time to first token, then the gap before each later token."""

    def __init__(self, metrics: Metrics, start: float):
        self.metrics, self.start, self.last = metrics, start, None

    def tokens(self, n: int, now: float) -> None:
        if n <= 0:
            return
        self.metrics.generation_tokens.inc(n)
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            for _ in range(n):  # a speculative step brings two tokens at once: each gets half the gap
                self.metrics.tpot.observe((now - self.last) / n)
        self.last = now

    def finish(self, reason: str, now: float) -> None:
        self.metrics.finished.labels(reason).inc()
        self.metrics.e2e.observe(now - self.start)
