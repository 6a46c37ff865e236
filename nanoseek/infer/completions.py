"""Chat and text completions for one served model (server.py routes to them): admission, tokenization off
the event loop, the engine's deltas as OpenAI responses or server-sent events, and the bounds every request
ends within (see server.py's docstring)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fastapi import Request
from fastapi.responses import StreamingResponse

from nanoseek.infer.metrics import Metrics, Timer
from nanoseek.infer.protocol import APIError, ChatBody, CompletionBody, DetokenizeBody, Message, TokenizeBody
from nanoseek.infer.responses import Choice, usage
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.worker import EngineThread, Ticket

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
            raise APIError(400, f"the last message must be the user's, got {messages[-1].role!r}", param="messages",
                           code="invalid_conversation")
        plain = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]
        self._too_long(sum(len(m["content"].encode()) for m in plain), "messages")
        try:
            return await self._off_loop(self.tok.apply_chat, plain)
        except ValueError as e:  # the template's own refusal
            raise APIError(400, str(e), param="messages", code="invalid_conversation") from None

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
