"""Load benchmark of `nanoseek serve`: concurrent streaming clients against the OpenAI-compatible server.

    .venv/bin/python bench/serve_load.py                         # random `nano` model, 64 clients, 30 s, 3 runs
    .venv/bin/python bench/serve_load.py --clients 8 64 --seconds 10 --repeats 2
    .venv/bin/python bench/serve_load.py --model runs/demo/grpo --clients 16 64   # a run / checkpoint / HF dir

The server is a subprocess (`python -m nanoseek serve MODEL --host 127.0.0.1 --port FREE_PORT --max-concurrent
32`), used once GET /health answers 200. Without --model, a temporary HF-format directory holds a BPE tokenizer
trained on 2,000 built-in documents and a random `--preset` model (it rarely ends early: ~max_tokens each).
Load: `--clients` asyncio clients send requests back to back for `--seconds` (those begun before the end finish),
alternating /v1/chat/completions and /v1/completions over 4 held-out built-in prompts, stream=true with
include_usage, --max-tokens, temperature 0.7. A 429 is retried after 50-150 ms (counted, not an error); any other
answer that is not a full stream ending in `data: [DONE]` after a usage chunk (another status, an {"error"}
event, a timeout, a connection error) is an error. One request per endpoint warms the server up first.
Per request, from the send of its accepted (non-429) attempt: TTFT (to the first chunk with non-empty content /
reasoning_content / text), per-token latency ((end - first token) / (usage.completion_tokens - 1)), end to end.
Per run: requests/s and output tokens/s over the run's wall time, p50/p99 TTFT and per-token latency, errors,
429 retries, /health's in_flight after the run.
The markdown table has a row per run (`--repeats` per client count, one server) plus the median and min-max.
At the end: /health, /metrics' in_flight lines (unless 404), the server log's error lines, SIGTERM shutdown
(exit code, 0 when graceful, and seconds). Exit code 1 on any error,
in_flight != 0 at the end or a server that did not exit. Clients and server share the CPU cores.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx


class StreamError(Exception):
    """A response that is not a complete stream (args[0]: what went wrong)."""


def random_model(out: Path, preset: str) -> Path:
    """A tokenizer trained on built-in documents + a random `preset` model of its vocabulary, in HF format."""
    import torch
    from safetensors.torch import save_file

    from nanoseek import ModelConfig, Transformer
    from nanoseek.data.builtin import generate_corpus
    from nanoseek.data.tokenizer import Tokenizer

    tok = Tokenizer.train(iter([p.document for p in generate_corpus(2000)]), vocab_size=1024, out_dir=out)
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset, vocab_size=tok.vocab_size)
    tensors = {k: t.contiguous().clone() for k, t in Transformer(cfg).hf_state_dict().items()}  # MTP copies: unshared
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (nan for no data)."""
    xs = sorted(xs)
    return xs[max(0, math.ceil(q * len(xs)) - 1)] if xs else math.nan


async def one_request(http: httpx.AsyncClient, chat: bool, prompt: str, model: str, max_tokens: int,
                      out: dict) -> bool:
    """Stream one completion and record it in `out`; False on a 429 (raises on anything but a full stream)."""
    body = {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "max_tokens": max_tokens, "temperature": 0.7}
    body |= {"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}
    t0 = time.perf_counter()
    first, tokens = None, None
    async with http.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
        if r.status_code == 429:
            await r.aread()
            return False
        if r.status_code != 200:
            raise StreamError(f"HTTP {r.status_code}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise StreamError("error event")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for c in chunk["choices"]:
                delta = c.get("delta") or {}
                if first is None and (c.get("text") or delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter()
        else:
            raise StreamError("stream ended without [DONE]")
    if tokens is None:
        raise StreamError("no usage chunk")
    end = time.perf_counter()
    out["done"], out["tokens"] = out["done"] + 1, out["tokens"] + tokens
    out["e2e"].append(end - t0)
    if first is not None:  # no TTFT when every piece decoded to "" (e.g. a bare <think>)
        out["ttft"].append(first - t0)
        if tokens >= 2:
            out["tpot"].append((end - first) / (tokens - 1))
    return True


async def client(http, k: int, deadline: float, prompts: list[str], model: str, max_tokens: int, out: dict):
    for i in itertools.count(k):  # clients start at different points of the endpoint / prompt cycle
        chat, prompt = i % 2 == 0, prompts[(i // 2) % len(prompts)]
        while True:
            t0 = time.perf_counter()
            try:
                if await one_request(http, chat, prompt, model, max_tokens, out):
                    break
            except (StreamError, httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
                out["errors"][e.args[0] if isinstance(e, StreamError) else type(e).__name__] += 1
                break
            out["429"] += 1
            if t0 > deadline:  # the server stayed busy past the end: give this request up
                break
            await asyncio.sleep(random.uniform(0.05, 0.15))
        if time.perf_counter() >= deadline:  # checked after the request: every client sends at least one
            return


async def load_run(base: str, n_clients: int, seconds: float, prompts: list[str], model: str, max_tokens: int,
                   timeout: float) -> dict:
    out = {"done": 0, "tokens": 0, "e2e": [], "ttft": [], "tpot": [], "errors": Counter(), "429": 0}
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits, trust_env=False) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, k, t0 + seconds, prompts, model, max_tokens, out)
                               for k in range(n_clients)))
        out["wall"] = time.perf_counter() - t0
        out["in_flight"] = (await http.get("/health")).json()["in_flight"]
    return out


def row(r: dict) -> dict:
    return {"req/s": r["done"] / r["wall"], "out tok/s": r["tokens"] / r["wall"],
            "TTFT p50 ms": 1e3 * pct(r["ttft"], 0.5), "TTFT p99 ms": 1e3 * pct(r["ttft"], 0.99),
            "tok p50 ms": 1e3 * pct(r["tpot"], 0.5), "tok p99 ms": 1e3 * pct(r["tpot"], 0.99),
            "e2e p50 s": pct(r["e2e"], 0.5), "requests": r["done"], "errors": sum(r["errors"].values()),
            "429s": r["429"], "in_flight": r["in_flight"]}


def table(rows_by_clients: dict[int, list[dict]]) -> str:
    cols = list(next(iter(rows_by_clients.values()))[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) and v < 100 else f"{v:.0f}"  # noqa: E731
    lines = ["| clients | run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for n, rows in rows_by_clients.items():
        lines += [f"| {n} | {i + 1} | " + " | ".join(fmt(r[c]) for c in cols) + " |" for i, r in enumerate(rows)]
        lines.append(f"| {n} | median | " + " | ".join(fmt(statistics.median(r[c] for r in rows)) for c in cols) + " |")
        lines.append(f"| {n} | min-max | " + " | ".join(
            f"{fmt(min(r[c] for r in rows))}-{fmt(max(r[c] for r in rows))}" for c in cols) + " |")
    return "\n".join(lines)


def start_server(args, model_dir: Path, port: int, log_file: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
           "--max-concurrent", str(args.max_concurrent), "--max-batch", str(args.max_batch)]
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd + (["--device", args.device] if args.device else []), stdout=log, stderr=log)
    base, t0 = f"http://127.0.0.1:{port}", time.perf_counter()
    while time.perf_counter() - t0 < args.startup_timeout and proc.poll() is None:
        try:
            if httpx.get(f"{base}/health", timeout=2, trust_env=False).status_code == 200:
                print(f"server up on {base} after {time.perf_counter() - t0:.1f} s", flush=True)
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    tail = "\n".join(log_file.read_text().splitlines()[-20:])
    raise RuntimeError(f"the server did not answer /health with 200 (exit code {proc.wait()}); its log ends:\n{tail}")


def stop_server(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGTERM; True if the server exits within `timeout` seconds (else it is killed)."""
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    try:
        print(f"shutdown: exit code {proc.wait(timeout)}, {time.perf_counter() - t0:.2f} s after SIGTERM")
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        print(f"shutdown: still running {timeout} s after SIGTERM; killed (exit code {proc.wait()})")
        return False


def bench(args, model_dir: Path, log_file: Path) -> bool:
    from nanoseek.data.builtin import heldout

    prompts = [p.prompt for p in heldout(4)]
    proc, base = start_server(args, model_dir, free_port(), log_file)
    try:
        model = httpx.get(f"{base}/v1/models", trust_env=False).json()["data"][0]["id"]
        asyncio.run(load_run(base, 2, 0, prompts, model, args.max_tokens, args.timeout))  # warm-up: 1 per endpoint
        rows: dict[int, list[dict]] = {}
        for n in args.clients:
            for rep in range(args.repeats):
                r = asyncio.run(load_run(base, n, args.seconds, prompts, model, args.max_tokens, args.timeout))
                rows.setdefault(n, []).append(row(r))
                print(f"clients={n} run {rep + 1}: {r['done']} requests, errors {dict(r['errors'])}, "
                      f"{r['429']} 429s, in_flight after {r['in_flight']}", flush=True)
        print(f"\nmodel {model_dir} ({model}), max_tokens {args.max_tokens}, {args.seconds:g} s per run, "
              f"server --max-concurrent {args.max_concurrent} --max-batch {args.max_batch}\n")
        print(table(rows) + "\n")
        health = httpx.get(f"{base}/health", trust_env=False).json()
        print(f"/health: {health}")
        metrics = httpx.get(f"{base}/metrics", trust_env=False)
        if metrics.status_code != 404:
            print(f"/metrics (HTTP {metrics.status_code}): " + "; ".join(
                line for line in metrics.text.splitlines() if "in_flight" in line and not line.startswith("#")))
    finally:
        exited = stop_server(proc, args.shutdown_timeout)
    log = log_file.read_text()
    problems = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line or '" 500' in line]
    print(f"graceful shutdown (log says 'Application shutdown complete'): {'Application shutdown complete' in log}")
    print(f"server log: {len(problems)} error lines" + "".join(f"\n  {p}" for p in problems[:10]))
    errors = sum(r["errors"] for rs in rows.values() for r in rs)
    return errors == 0 and health["in_flight"] == 0 and exited


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="run / checkpoint / HF directory (default: a random --preset model)")
    p.add_argument("--preset", default="nano", help="preset of the random model")
    for flag, kind, default in [("--seconds", float, 30), ("--repeats", int, 3), ("--max-tokens", int, 32),
                                ("--max-concurrent", int, 32), ("--max-batch", int, 16)]:
        p.add_argument(flag, type=kind, default=default)
    p.add_argument("--clients", type=int, nargs="+", default=[64], help="one block of runs per value")
    p.add_argument("--device", help="passed to nanoseek serve (default: its own)")
    p.add_argument("--timeout", type=float, default=120, help="per-request httpx timeout, seconds")
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--shutdown-timeout", type=float, default=30)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        model_dir = args.model or random_model(Path(tmp) / f"random-{args.preset}", args.preset)
        ok = bench(args, model_dir, Path(tmp) / "server.log")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
