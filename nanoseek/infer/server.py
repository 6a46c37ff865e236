"""OpenAI-compatible HTTP server for the inference engine, and the web chat page.

Endpoints: GET / (the chat page, static/index.html), GET /health, GET /metrics (Prometheus), GET /v1/models,
POST /v1/chat/completions and POST /v1/completions (streamed as server-sent events, `data: {chunk}` lines
then `data: [DONE]`, or not), and vLLM's POST /tokenize, POST /detokenize, GET /tokenizer_info (what
lm-evaluation-harness's remote tokenizer reads). The dialect is in protocol.py, the response shapes in
responses.py, request handling in completions.py, the engine's thread and the request tickets in worker.py,
the API key and body limit in access.py.

Every request ends in bounded time, with a response or an OpenAI error:
- the body is at most `max_body_bytes` (413, checked while it is read);
- a prompt whose bytes alone prove it longer than the context (a token covers at most
  `tokenizer.max_token_bytes` bytes) is refused before it is tokenized; tokenization runs off the event loop;
- a request is in flight from admission (429 past `max_concurrent`) until its ticket closes, on every exit
  path; it has `request_timeout` seconds in all (408); a non-streamed request whose client disconnects is
  cancelled within `DISCONNECT_POLL` seconds, a streamed one at once;
- on SIGTERM/SIGINT new requests get 503, those in flight have `shutdown_grace` seconds to finish, then end
  with a 503 (an error event when streamed), and the process exits 0.
The OpenAPI schema (GET /openapi.json) documents each of these statuses where it can occur, every body, and
the streamed events; an undeclared method gets 405 with `Allow`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from nanoseek.infer.access import Gate, exposure_warning, require_key
from nanoseek.infer.completions import Completions, ServeConfig
from nanoseek.infer.engine import Engine
from nanoseek.infer.metrics import Metrics
from nanoseek.infer.protocol import (ChatBody, CompletionBody, DetokenizeBody, ErrorBody, TokenizeBody, conform,
                                     errors, install_error_handlers)
from nanoseek.infer.responses import (ChatCompletion, ChatCompletionChunk, Detokenized, Health, ModelList,
                                      TextCompletion, TextCompletionChunk, Tokenized, TokenizerInfo, event_stream,
                                      stream_components)
from nanoseek.infer.worker import EngineThread

if TYPE_CHECKING:
    from nanoseek.hf import Pretrained

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


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
    keyed = (401,) if cfg.api_key else ()
    generating = (400, *keyed, 404, 408, 413, 429, 503)

    def openapi() -> dict:
        if app.openapi_schema is None:  # FastAPI.openapi builds and caches it; conform finishes it in place
            schema = conform(FastAPI.openapi(app), {"model": engine.model.config.vocab_size,
                                                    "tokenizer": tokenizer.vocab_size})
            schema["components"]["schemas"].update(stream_components(ChatCompletionChunk, TextCompletionChunk,
                                                                     ErrorBody))
        return app.openapi_schema
    app.openapi = openapi

    @app.get("/", include_in_schema=False)
    async def chat_page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health", responses={200: {"model": Health}, 503: {"model": Health, "description": "Not ok"}})
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

    @app.get("/v1/models", dependencies=auth, responses={200: {"model": ModelList}, **errors(*keyed)})
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "nanoseek", "max_model_len": engine.max_len}]}

    @app.post("/v1/chat/completions", dependencies=auth, responses={
        200: {"model": ChatCompletion, "content": event_stream(ChatCompletionChunk, ErrorBody)}, **errors(*generating)})
    async def chat_completions(body: ChatBody, request: Request):
        return await completions.respond(body, request)

    @app.post("/v1/completions", dependencies=auth, responses={
        200: {"model": TextCompletion, "content": event_stream(TextCompletionChunk, ErrorBody)}, **errors(*generating)})
    async def text_completions(body: CompletionBody, request: Request):
        return await completions.respond(body, request)

    @app.post("/tokenize", dependencies=auth, responses={200: {"model": Tokenized}, **errors(400, *keyed, 413)})
    async def tokenize(body: TokenizeBody):
        return await completions.tokenize(body)

    @app.post("/detokenize", dependencies=auth, responses={200: {"model": Detokenized},
                                                           **errors(400, *keyed, 413)})
    async def detokenize(body: DetokenizeBody):
        return await completions.detokenize(body)

    @app.get("/tokenizer_info", dependencies=auth, responses={200: {"model": TokenizerInfo}, **errors(*keyed)})
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
