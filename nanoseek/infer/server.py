"""OpenAI-compatible HTTP server for the inference engine, and the web chat page.

Endpoints: GET / (the chat page, static/index.html), GET /health, GET /metrics (Prometheus), GET /v1/models,
POST /v1/chat/completions and POST /v1/completions (streamed as server-sent events, `data: {chunk}` lines
then `data: [DONE]`, or not), and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info (what
lm-evaluation-harness's remote tokenizer reads). The dialect is in protocol.py, the response shapes in
responses.py, the engine's thread and the request tickets in worker.py, the API key and body limit in
access.py.

Every request ends in bounded time, with a response or an OpenAI error:
- the body is at most `max_body_bytes` (413, checked while it is read);
- a prompt whose bytes alone prove it longer than the context (a token covers at most
  `tokenizer.max_token_bytes` bytes) is refused before it is tokenized; tokenization runs off the event loop;
- a request is in flight from admission (429 past `max_concurrent`) until its ticket closes, on every exit
  path; it has `request_timeout` seconds in all (408); a non-streamed request whose client disconnects is
  cancelled within `DISCONNECT_POLL` seconds, a streamed one at once;
- on SIGTERM/SIGINT new requests get 503, those in flight have `shutdown_grace` seconds to finish, then end
  with a 503 (an error event when streamed), and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from nanoseek.infer.access import Gate, exposure_warning, require_key
from nanoseek.infer.engine import Engine
from nanoseek.infer.metrics import Metrics, Timer
from nanoseek.infer.protocol import (APIError, ChatBody, CompletionBody, DetokenizeBody, Message, TokenizeBody,
                                     install_error_handlers)
from nanoseek.infer.responses import Choice, usage
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.worker import EngineThread, Ticket

if TYPE_CHECKING:
    from nanoseek.hf import Pretrained

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streamed request's client is still there


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1 and tokenizer requests need `Authorization: Bearer <api_key>`
    max_concurrent: int = 32  # engine requests in flight (running + waiting; n choices count n); past it: 429
    max_batch: int = 16  # engine rows decoded together
    max_len: int | None = None  # context (prompt + completion) in tokens; None: the model's max_position_embeddings
    speculative: bool = False  # MTP speculative decoding
    max_tokens_default: int = 256  # completion limit when a request sets none (capped by the context)
    model_name: str | None = None  # the `model` clients must send; None: the model directory's name
    request_timeout: float = 600.0  # seconds a request may take in all (queue, prefill, decoding); past it: 408
    max_body_bytes: int = 8 << 20  # request bodies larger than this get 413
    shutdown_grace: float = 5.0  # seconds in-flight requests get to finish after SIGTERM / SIGINT

    def __post_init__(self):
        checks = [("port", 1 <= self.port <= 65535, "in [1, 65535]"),
                  ("api_key", self.api_key != "", "non-empty (or None for no key)"),
                  ("max_concurrent", self.max_concurrent >= 1, ">= 1"),
                  ("max_batch", self.max_batch >= 1, ">= 1"),
                  ("max_len", self.max_len is None or self.max_len >= 2, ">= 2 (or None)"),
                  ("max_tokens_default", self.max_tokens_default >= 1, ">= 1"),
                  ("model_name", self.model_name != "", "non-empty (or None for the directory's name)"),
                  ("request_timeout", self.request_timeout > 0, "> 0"),
                  ("max_body_bytes", self.max_body_bytes >= 1024, ">= 1024"),
                  ("shutdown_grace", self.shutdown_grace >= 0, ">= 0")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {rule}")


# ---------------------------------------------------------------------- completions
class Completions:
    """Chat and text completions for one served model."""

    def __init__(self, worker: EngineThread, tokenizer, cfg: ServeConfig, name: str, metrics: Metrics):
        self.worker, self.tok, self.cfg, self.name, self.metrics = worker, tokenizer, cfg, name, metrics
        self.max_len = worker.engine.max_len
        self.vocab = worker.engine.model.config.vocab_size
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="nanoseek-tokenize")  # off the event loop
        self.draining = False

    def drain(self) -> None:
        """Refuse new requests and abort those still in flight once 80% of the grace has passed (uvicorn cancels
        its tasks at 100%); safe to call from a signal handler, as it only schedules work on the event loop."""
        reason = ("the server is shutting down: this request did not finish within the shutdown grace of "
                  f"{self.cfg.shutdown_grace:g} s")

        def begin():
            self.draining = True
            loop.call_later(self.cfg.shutdown_grace * 0.8, self.worker.abort, reason)
        loop = self.worker.loop
        loop.call_soon_threadsafe(begin)

    async def respond(self, body: ChatBody | CompletionBody, request: Request):
        start, chat = time.monotonic(), isinstance(body, ChatBody)
        if self.draining or not self.worker.alive:
            raise APIError(503, "the server is shutting down" if self.draining else
                           "the engine has stopped (see GET /health); restart the server", code="unavailable")
        if body.model != self.name:
            raise APIError(404, f"model {body.model!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")
        body.refuse_unsupported()
        param = "messages" if chat else "prompt"
        self._refuse_if_busy(body.n * (1 if chat else len(body.prompts)))  # before any tokenization
        prompts = [await self._chat_prompt(body.messages)] if chat else await self._text_prompts(body)
        params = [self._params(body, len(p), i) for p in prompts for i in range(body.n)]
        for p, sp in zip(prompts, params[::body.n]):
            if len(p) + sp.max_tokens > self.max_len:
                raise APIError(400, f"prompt ({len(p)} tokens) + max_tokens ({sp.max_tokens}) exceeds the context "
                                    f"of {self.max_len} tokens", param=param, code="context_length_exceeded")
        self._refuse_if_busy(len(params))  # again: others may have been admitted while this one was tokenized
        ticket = self.worker.ticket(len(params), self.cfg.request_timeout - (time.monotonic() - start))
        try:
            await asyncio.wait_for(self.worker.submit(ticket, [p for p in prompts for _ in range(body.n)], params),
                                   max(ticket.deadline - time.monotonic(), 0.001))
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
            echo = [self._echo(body, p) for p in prompts for _ in range(body.n)]
            prompt_only = body.limit == 0  # one token is generated and dropped: the prompt's log-probs only
            choices = [Choice(i, r, chat, self.tok, echo[i], prompt_only) for i, r in enumerate(ticket.requests)]
            head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": self.name}
            if body.stream:
                include = body.stream_options is not None and body.stream_options.include_usage
                stream = _sse(self._chunks(head, chat, prompts, ticket, choices, include, start))
                ticket = None  # the stream closes it
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            of = dict(zip(ticket.requests, choices))
            async for d in self._deltas(ticket, start, request):
                if d.finish_reason in ("error", "aborted"):
                    raise _failed(d)
                of[d.request].add(d)
            return {**head, "object": "chat.completion" if chat else "text_completion",
                    "choices": [c.final() for c in choices], "usage": usage(prompts, choices)}
        except ValueError as e:  # engine.add: the prompt does not fit (the checks above make this rare)
            raise APIError(400, str(e), param=param, code="context_length_exceeded") from None
        except asyncio.TimeoutError:
            raise APIError(408, f"the request did not finish within request_timeout={self.cfg.request_timeout:g} s "
                                "(the server's --request-timeout); it was cancelled", code="timeout") from None
        finally:
            if ticket is not None:
                ticket.close()

    def _refuse_if_busy(self, n: int) -> None:
        if (in_flight := self.worker.in_flight) + n > self.cfg.max_concurrent:
            raise APIError(429, f"the server is busy: {in_flight} requests in flight, {n} more would exceed "
                                f"max_concurrent={self.cfg.max_concurrent}; retry shortly")

    async def _deltas(self, ticket: Ticket, start: float, request: Request | None = None):
        """The ticket's deltas until all its requests have finished, with their token timings recorded.
        Raises asyncio.TimeoutError at the deadline, APIError(499) when `request`'s client has gone."""
        timers = {r: Timer(self.metrics, start) for r in ticket.requests}
        pending, checked = len(ticket.requests), time.monotonic()
        while pending:
            now = time.monotonic()
            if now >= ticket.deadline:
                raise asyncio.TimeoutError
            if request is not None and now - checked >= DISCONNECT_POLL:
                checked = now
                if await request.is_disconnected():
                    raise APIError(499, "the client closed the connection", code="client_closed")
            try:
                d = await asyncio.wait_for(ticket.queue.get(), min(ticket.deadline - now, DISCONNECT_POLL))
            except asyncio.TimeoutError:
                continue
            now = time.monotonic()
            timers[d.request].tokens(len(d.tokens), now)
            if d.finish_reason is not None:
                pending -= 1
                timers[d.request].finish(d.finish_reason, now)
            yield d

    async def _chunks(self, head: dict, chat: bool, prompts: list[list[int]], ticket: Ticket,
                      choices: list[Choice], include_usage: bool, start: float) -> AsyncIterator[dict]:
        """Stream chunks: the role (chat) or echoed prompt first, then each delta, finish_reason on each
        choice's last chunk; with include_usage, a final chunk with the usage and no choices."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        index = {c.request: c for c in choices}
        try:
            for c in choices:
                if (piece := c.start()) is not None:
                    yield {**head, "choices": [{"index": c.index, **piece, "finish_reason": None}]}
            async for d in self._deltas(ticket, start):
                if d.finish_reason in ("error", "aborted"):
                    yield _failed(d).body()  # the status line has gone out: an error event, as OpenAI's
                    return
                c = index[d.request]
                if (piece := c.chunk_piece(d)) is not None:
                    yield {**head, "choices": [{"index": c.index, **piece}]}
            if include_usage:
                yield {**head, "choices": [], "usage": usage(prompts, choices)}
        except asyncio.TimeoutError:
            yield APIError(408, f"the request did not finish within request_timeout={self.cfg.request_timeout:g} s; "
                                "it was cancelled", code="timeout").body()
        finally:
            ticket.close()

    # ------------------------------------------------------------------ prompts
    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _too_long(self, nbytes: int, param: str) -> None:
        """Refuse a text whose bytes alone prove it has more tokens than the context holds (at least 1 + a
        token for the completion), before any tokenization."""
        least = -(-nbytes // self.tok.max_token_bytes)
        if least >= self.max_len:
            raise APIError(400, f"the {param} has {nbytes} bytes, so at least {least} tokens (a token covers at "
                                f"most {self.tok.max_token_bytes} bytes): more than the context of {self.max_len} "
                                "tokens", param=param, code="context_length_exceeded")

    async def _chat_prompt(self, messages: list[Message]) -> list[int]:
        if messages[-1].role != "user":
            raise APIError(400, f"the last message must be the user's, got {messages[-1].role!r}", param="messages")
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        self._too_long(sum(len(m["content"].encode()) for m in plain), "messages")
        try:
            return await self._off_loop(self.tok.apply_chat, plain)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    async def _text_prompts(self, body: CompletionBody) -> list[list[int]]:
        """Token ids of each prompt: text gets the training documents' BOS (unless it starts with it), ids are
        used as given (checked against the vocabulary)."""
        out = []
        for p in body.prompts:
            if isinstance(p, str):
                self._too_long(len(p.encode()), "prompt")
                bos = self.tok.special_tokens.get("bos_token")
                out.append(await self._off_loop(lambda s: self.tok.encode(s, bos=not (bos and s.startswith(bos))), p))
                continue
            bad = next((i for i, t in enumerate(p) if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt token {p[bad]} at index {bad} is outside the vocabulary "
                                    f"[0, {self.vocab})", param="prompt")
            out.append(p)
        return out

    def _echo(self, body, prompt: list[int]) -> str | None:
        if not isinstance(body, CompletionBody) or not body.echo:
            return None
        return body.prompt if isinstance(body.prompt, str) else self.tok.decode(prompt)

    def _params(self, body: ChatBody | CompletionBody, prompt_len: int, i: int) -> SamplingParams:
        """Choice i's SamplingParams; without a max_tokens, max_tokens_default capped by the context."""
        max_tokens = body.limit or max(1, min(self.cfg.max_tokens_default, self.max_len - prompt_len))
        max_tokens = 1 if body.limit == 0 else max_tokens
        echo = isinstance(body, CompletionBody) and body.echo
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                  top_p=body.top_p, seed=None if body.seed is None else body.seed + i,
                                  stop=body.stops, logprobs=body.logprobs_k,
                                  prompt_logprobs=body.logprobs_k if echo else None)
        except ValueError as e:  # the body's ranges match SamplingParams' but for empty stop strings
            raise APIError(400, str(e), param="stop") from None

    # ------------------------------------------------------------------ tokenizer endpoints
    async def tokenize(self, body: TokenizeBody) -> dict:
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "send exactly one of prompt and messages", param="prompt")
        if body.messages is not None:
            ids = await self._chat_prompt(body.messages)
        else:
            self._too_long(len(body.prompt.encode()), "prompt")
            ids = await self._off_loop(lambda s: self.tok.encode(s, bos=body.add_special_tokens), body.prompt)
        return {"count": len(ids), "max_model_len": self.max_len, "tokens": ids}

    async def detokenize(self, body: DetokenizeBody) -> dict:
        bad = next((t for t in body.tokens if not 0 <= t < self.tok.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token {bad} is outside the tokenizer's vocabulary [0, {self.tok.vocab_size})",
                           param="tokens")
        return {"prompt": await self._off_loop(self.tok.decode, body.tokens)}


def _failed(d) -> APIError:
    if d.finish_reason == "aborted":
        return APIError(503, d.request.error, code="unavailable")
    return APIError(500, f"generation failed: {d.request.error or 'the engine step raised an error'}",
                    code="generation_failed")


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------- the app
def create_app(model, tokenizer, cfg: ServeConfig, name: str) -> FastAPI:
    """The app serving `model` as `cfg.model_name or name`; its lifespan starts and stops the engine thread.
    `app.state.drain()` makes it refuse new requests (what serve() calls on SIGTERM / SIGINT)."""
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer, and the model directory has no tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_size} tokens do not fit the model's vocabulary of "
                         f"{model.config.vocab_size}: they are not a pair")
    name = cfg.model_name or name
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_len=cfg.max_len, speculative=cfg.speculative)
    worker = EngineThread(engine)
    metrics = Metrics(lambda: len(engine.running), lambda: worker.queued, lambda: worker.in_flight)
    completions = Completions(worker, tokenizer, cfg, name, metrics)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_):
        worker.start()

        async def reap():
            while True:
                await asyncio.sleep(1.0)
                worker.reap()
        reaper = asyncio.create_task(reap())
        yield
        reaper.cancel()
        worker.stop()
        completions.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.worker = worker
    app.state.drain = completions.drain
    app.add_middleware(Gate, limit=cfg.max_body_bytes, metrics=metrics)
    install_error_handlers(app)
    auth = [Depends(require_key(cfg.api_key))] if cfg.api_key else []

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        status = "dead" if not worker.alive else "draining" if completions.draining else "ok"
        body = {"status": status, "model": name, "engine_alive": worker.alive,
                "seconds_since_step": round(time.monotonic() - worker.beat, 3), "running": len(engine.running),
                "queued": worker.queued, "in_flight": worker.in_flight, **engine.stats,
                "acceptance_rate": engine.acceptance_rate}
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_len}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatBody, request: Request):
        return await completions.respond(body, request)

    @app.post("/v1/completions", dependencies=auth)
    async def text_completions(body: CompletionBody, request: Request):
        return await completions.respond(body, request)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeBody):
        return await completions.tokenize(body)

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeBody):
        return await completions.detokenize(body)

    @app.get("/tokenizer_info", dependencies=auth)
    async def tokenizer_info():
        return {"tokenizer_class": "nanoseek", "pad_token": None, **tokenizer.special_tokens,
                "chat_template": tokenizer.template.source, "model_max_length": engine.max_len,
                "vocab_size": tokenizer.vocab_size}

    return app


def serve(pretrained: Pretrained, cfg: ServeConfig) -> None:
    """Serve the model on cfg.host:cfg.port until SIGTERM / SIGINT (blocking); see the module docstring."""
    import signal

    import uvicorn

    app = create_app(pretrained.model, pretrained.tokenizer, cfg, pretrained.name)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            app.state.drain()
            super().handle_exit(sig, frame)

    if (warning := exposure_warning(cfg.host, cfg.api_key)) is not None:
        print(warning, file=sys.stderr, flush=True)
    print(f"serving {cfg.model_name or pretrained.name}: chat page at http://{cfg.host}:{cfg.port}/, "
          f"OpenAI API at http://{cfg.host}:{cfg.port}/v1", flush=True)
    # uvicorn re-raises the signal that stopped it once it has shut down; handlers that ignore it make the
    # process exit 0 after the graceful shutdown instead of dying of the signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="info",
                          timeout_graceful_shutdown=cfg.shutdown_grace)).run()
