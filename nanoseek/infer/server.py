"""OpenAI-compatible HTTP server for the inference engine, and the web chat page.

Endpoints: GET / (the chat page, static/index.html), GET /health, GET /v1/models, POST /v1/chat/completions
and POST /v1/completions, streamed as server-sent events (`data: {chunk}` lines, then `data: [DONE]`) or not.
A chat completion is split as in DeepSeek's API: `reasoning_content` (between <think> and </think>) apart
from `content` (the answer); text completions return the raw `text`. Errors have OpenAI's shape,
{"error": {"message", "type", "param", "code"}}, and HTTP status (400, 401, 404, 429, 500).

Threads: the engine is not thread-safe, so one background thread owns it (EngineThread): it adds the requests
that HTTP handlers put in its inbox, steps the engine (sleeping while there is no work) and hands each update to
its request's asyncio.Queue through `loop.call_soon_threadsafe`; the handlers, on the event loop, read those
queues. A request is in flight (counted against `max_concurrent`) from its submission to its last update; a
streaming client that disconnects cancels its requests, and the engine frees their rows at its next step.

Left out: tools, logprobs, presence / frequency penalties, logit_bias, system messages (the chat format has
none, as R1 recommends), multi-part message content. Unknown body fields are ignored, as OpenAI clients send
many; `n` choices are n independent requests (with `seed`, choice i uses seed + i).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import reprlib
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from nanoseek.data.tokenizer import BOS
from nanoseek.infer.engine import Engine
from nanoseek.infer.engine import Request as EngineRequest
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.text import ReasoningSplitter, split_reasoning

if TYPE_CHECKING:
    from nanoseek.hf import Pretrained

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # when set, /v1 requests need `Authorization: Bearer <api_key>`
    max_concurrent: int = 32  # engine requests in flight (running + waiting; n choices count n); past it: 429
    max_batch: int = 16  # engine rows decoded together
    max_len: int | None = None  # context (prompt + completion) in tokens; None: the model's max_position_embeddings
    speculative: bool = False  # MTP speculative decoding
    max_tokens_default: int = 256  # completion limit when a request sets none (capped by the context)
    model_name: str | None = None  # the `model` clients must send; None: the model directory's name

    def __post_init__(self):
        checks = [("port", 1 <= self.port <= 65535, "in [1, 65535]"),
                  ("api_key", self.api_key != "", "non-empty (or None for no key)"),
                  ("max_concurrent", self.max_concurrent >= 1, ">= 1"),
                  ("max_batch", self.max_batch >= 1, ">= 1"),
                  ("max_len", self.max_len is None or self.max_len >= 2, ">= 2 (or None)"),
                  ("max_tokens_default", self.max_tokens_default >= 1, ">= 1"),
                  ("model_name", self.model_name != "", "non-empty (or None for the directory's name)")]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} must be {rule}")


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered in OpenAI's shape."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             429: "rate_limit_error", 500: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def _validation_error(e: RequestValidationError) -> APIError:
    """FastAPI's 422 as OpenAI's 400: the message names each bad field (`messages.0.role`) and the value it
    got; `param` is the first one's top-level field."""
    errors = e.errors()
    if any(err["type"] == "json_invalid" for err in errors):
        return APIError(400, f"the request body is not valid JSON: {errors[0]['msg']}")
    parts = []
    for err in errors:
        where = ".".join(str(x) for x in err["loc"][1:]) or "body"  # loc[0] is "body"
        got = "" if err["type"] == "missing" else f" (got {reprlib.repr(err.get('input'))})"
        parts.append(f"{where}: {err['msg']}{got}")
    fields = errors[0]["loc"][1:]
    return APIError(400, "; ".join(parts), param=str(fields[0]) if fields else None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, e: RequestValidationError):
        return _validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # unknown path (404), wrong method (405)
        return APIError(e.status_code, str(e.detail)).response()


def _require_key(key: str):
    """A dependency that answers 401 unless the request carries `Authorization: Bearer <key>`."""
    expected = f"Bearer {key}".encode()

    async def check(request: Request) -> None:
        if not hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            raise APIError(401, "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                           code="invalid_api_key")
    return check


# ---------------------------------------------------------------------- request bodies
class Message(BaseModel):
    role: str
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionParams(BaseModel):
    """Fields shared by chat and text completions: OpenAI's names and ranges (top_k is an extension)."""
    model: str
    n: int = Field(1, ge=1, le=8)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatBody(CompletionParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; wins over it


class CompletionBody(CompletionParams):
    prompt: str


# ---------------------------------------------------------------------- the engine thread
@dataclass(frozen=True)
class Delta:
    """An engine Update, frozen in the engine thread: its request keeps changing there after the step."""
    request: EngineRequest
    text: str
    finish_reason: str | None


class EngineThread:
    """Owns the engine: one background thread adds requests to it, steps it and routes each update to its
    request's asyncio.Queue. The event loop hands requests over through an inbox (a deque) and gets results
    back through `loop.call_soon_threadsafe`, so the engine is only ever touched by this thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.queues: dict[EngineRequest, asyncio.Queue] = {}  # requests in the engine; used on the event loop
        self.pending = 0  # requests in the inbox, not yet in the engine; used on the event loop
        self._inbox: deque[tuple[list[int], list[SamplingParams], asyncio.Future]] = deque()
        self._wake, self._stopping = threading.Event(), False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def in_flight(self) -> int:
        return len(self.queues) + self.pending

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    async def submit(self, prompt: list[int], params: list[SamplingParams]
                     ) -> tuple[list[EngineRequest], asyncio.Queue]:
        """Add one request per params (ValueError when the prompt does not fit); one queue gets all updates."""
        future = self._loop.create_future()
        self._inbox.append((prompt, params, future))
        self.pending += len(params)
        self._wake.set()
        return await future

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()  # cleared before the checks, so a submit() after them wakes the wait below
            while self._inbox:
                self._add(*self._inbox.popleft())
            if not self.engine.has_work():
                self._wake.wait()
                continue
            try:
                deltas = [Delta(u.request, u.text, u.request.finish_reason) for u in self.engine.step()]
            except Exception:
                log.exception("engine step failed; its requests end with an error")
                deltas = self._fail_all()
            if deltas:
                self._loop.call_soon_threadsafe(self._deliver, deltas)

    def _add(self, prompt: list[int], params: list[SamplingParams], future: asyncio.Future) -> None:
        try:  # the n requests share prompt and max_tokens: all fit or none
            result = [self.engine.add(prompt, p) for p in params]
        except ValueError as e:
            result = e
        self._loop.call_soon_threadsafe(self._added, len(params), future, result)

    def _added(self, n: int, future: asyncio.Future, result: list[EngineRequest] | ValueError) -> None:
        """On the event loop, before any update of these requests is delivered (callbacks run in order)."""
        self.pending -= n
        if future.cancelled():  # the client left while its requests were in the inbox
            for r in result if isinstance(result, list) else []:
                r.cancelled = True
        elif isinstance(result, ValueError):
            future.set_exception(result)
        else:
            queue = asyncio.Queue()
            self.queues.update(dict.fromkeys(result, queue))
            future.set_result((result, queue))

    def _fail_all(self) -> list[Delta]:
        """Empty the engine after a failed step (its rows are reused), ending every request with "error"."""
        failed = self.engine.abort_all()
        for r in failed:
            r.finish_reason = "error"
        return [Delta(r, "", "error") for r in failed]

    def _deliver(self, deltas: list[Delta]) -> None:
        for d in deltas:
            queue = self.queues.pop(d.request, None) if d.finish_reason else self.queues.get(d.request)
            if queue is not None:
                queue.put_nowait(d)


async def _deltas(requests: list[EngineRequest], queue: asyncio.Queue) -> AsyncIterator[Delta]:
    """The requests' deltas until all have finished; the unfinished ones are cancelled if the consumer stops
    early (a disconnected client: cancellation or GeneratorExit)."""
    pending = len(requests)
    try:
        while pending:
            d = await queue.get()
            pending -= d.finish_reason is not None
            yield d
    finally:
        for r in requests:
            if not r.done:
                r.cancelled = True


GENERATION_FAILED = APIError(500, "generation failed: the engine step raised an error (see the server log)")


# ---------------------------------------------------------------------- responses
class Completions:
    """Chat and text completions for one served model."""

    def __init__(self, worker: EngineThread, tokenizer, cfg: ServeConfig, name: str):
        self.worker, self.tokenizer, self.cfg, self.name = worker, tokenizer, cfg, name

    async def respond(self, body: ChatBody | CompletionBody):
        chat = isinstance(body, ChatBody)
        if body.model != self.name:
            raise APIError(404, f"model {body.model!r} does not exist: this server serves {self.name!r}",
                           param="model", code="model_not_found")
        prompt = self._chat_prompt(body.messages) if chat else self.tokenizer.encode(
            body.prompt, bos=not body.prompt.startswith(BOS))  # prompts start as training documents do
        params = self._sampling(body, len(prompt))
        in_flight = self.worker.in_flight
        if in_flight + body.n > self.cfg.max_concurrent:
            raise APIError(429, f"the server is busy: {in_flight} requests in flight, {body.n} more would "
                                f"exceed max_concurrent={self.cfg.max_concurrent}; retry shortly")
        try:
            requests, queue = await self.worker.submit(prompt, params)
        except ValueError as e:  # the prompt + max_tokens do not fit the context (the vocabulary is checked)
            raise APIError(400, str(e), param="messages" if chat else "prompt",
                           code="context_length_exceeded") from None
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.name}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            chunks = self._chunks(head, chat, prompt, requests, queue, usage)
            return StreamingResponse(_sse(chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        texts = dict.fromkeys(requests, "")
        async for d in _deltas(requests, queue):
            if d.finish_reason == "error":
                raise GENERATION_FAILED
            texts[d.request] += d.text
        choices = [_choice(i, texts[r], r.finish_reason, chat) for i, r in enumerate(requests)]
        return {**head, "object": "chat.completion" if chat else "text_completion", "choices": choices,
                "usage": _usage(prompt, requests)}

    def _chat_prompt(self, messages: list[Message]) -> list[int]:
        if messages[-1].role != "user":
            raise APIError(400, f"the last message must be the user's, got {messages[-1].role!r}", param="messages")
        try:
            return self.tokenizer.apply_chat([m.model_dump() for m in messages])
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None

    def _sampling(self, body: ChatBody | CompletionBody, prompt_len: int) -> list[SamplingParams]:
        """One SamplingParams per choice; without a max_tokens, max_tokens_default capped by the context."""
        max_tokens = (getattr(body, "max_completion_tokens", None) or body.max_tokens
                      or max(1, min(self.cfg.max_tokens_default, self.worker.engine.max_len - prompt_len)))
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        try:
            return [SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_k=body.top_k,
                                   top_p=body.top_p, seed=None if body.seed is None else body.seed + i, stop=stop)
                    for i in range(body.n)]
        except ValueError as e:  # the body's ranges match SamplingParams' but for empty stop strings
            raise APIError(400, str(e), param="stop") from None

    async def _chunks(self, head: dict, chat: bool, prompt: list[int], requests: list[EngineRequest],
                      queue: asyncio.Queue, include_usage: bool) -> AsyncIterator[dict]:
        """Stream chunks: chat deltas split into reasoning_content / content, or text; finish_reason on each
        choice's last chunk; with include_usage, a final chunk with the usage and no choices."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        index = {r: i for i, r in enumerate(requests)}
        splitters = [ReasoningSplitter() for _ in requests]
        if chat:
            for i in range(len(requests)):
                yield {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]}
        async for d in _deltas(requests, queue):
            if d.finish_reason == "error":
                yield GENERATION_FAILED.body()  # the status line has gone out: an error event, as OpenAI's
                return
            i = index[d.request]
            if chat:
                reasoning, content = splitters[i].push(d.text)
                piece = {"delta": {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}}
            else:
                piece = {"text": d.text}
            if any(piece.values()) or d.finish_reason:  # skip empty deltas (a bare <think>)
                yield {**head, "choices": [{"index": i, **piece, "logprobs": None, "finish_reason": d.finish_reason}]}
        if include_usage:
            yield {**head, "choices": [], "usage": _usage(prompt, requests)}


def _choice(i: int, text: str, finish_reason: str, chat: bool) -> dict:
    if not chat:
        return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
    reasoning, content = split_reasoning(text)
    return {"index": i, "message": {"role": "assistant", "content": content, "reasoning_content": reasoning},
            "logprobs": None, "finish_reason": finish_reason}


def _usage(prompt: list[int], requests: list[EngineRequest]) -> dict:
    completion = sum(len(r.tokens) for r in requests)
    return {"prompt_tokens": len(prompt), "completion_tokens": completion, "total_tokens": len(prompt) + completion}


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk)}\n\n"
    yield "data: [DONE]\n\n"


# ---------------------------------------------------------------------- the app
def create_app(model, tokenizer, cfg: ServeConfig, name: str) -> FastAPI:
    """The app serving `model` as `cfg.model_name or name`; its lifespan starts and stops the engine thread."""
    if tokenizer is None:
        raise ValueError("the server needs a tokenizer, and the model directory has no tokenizer.json")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer's {tokenizer.vocab_size} tokens do not fit the model's vocabulary of "
                         f"{model.config.vocab_size}: they are not a pair")
    name = cfg.model_name or name
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_len=cfg.max_len, speculative=cfg.speculative)
    worker = EngineThread(engine)
    completions = Completions(worker, tokenizer, cfg, name)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(_):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan)
    app.state.worker = worker
    _install_error_handlers(app)
    auth = [Depends(_require_key(cfg.api_key))] if cfg.api_key else []

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "running": len(engine.running), "waiting": len(engine.waiting),
                "in_flight": worker.in_flight, **engine.stats, "acceptance_rate": engine.acceptance_rate}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_len}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatBody):
        return await completions.respond(body)

    @app.post("/v1/completions", dependencies=auth)
    async def text_completions(body: CompletionBody):
        return await completions.respond(body)

    return app


def serve(pretrained: Pretrained, cfg: ServeConfig) -> None:
    """Serve the model on cfg.host:cfg.port until interrupted (blocking)."""
    import uvicorn

    app = create_app(pretrained.model, pretrained.tokenizer, cfg, pretrained.name)
    print(f"serving {cfg.model_name or pretrained.name}: chat page at http://{cfg.host}:{cfg.port}/, "
          f"OpenAI API at http://{cfg.host}:{cfg.port}/v1", flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info")
