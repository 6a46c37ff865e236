"""The OpenAI dialect the server speaks: request bodies, the parameters it refuses, errors in OpenAI's shape.

Bodies follow OpenAI's names and ranges (`top_k` is an extension, as in vLLM). Unknown fields are ignored, as
OpenAI clients send many; parameters nanoseek cannot honour (`tools`, `response_format` other than text,
`logit_bias`, penalties, non-text content parts, ...) are refused with a 400 that names the field, never
silently dropped. Chat `content` may be a string or a list of `{"type": "text", "text": ...}` parts (joined
with newlines, as vLLM does); a `developer` message is a `system` message. A completions `prompt` may be a
string, a list of strings, a list of token ids (used verbatim, no BOS added) or a list of such lists.
Where the schema can say what is served (the neutral values of refused parameters, text parts only, content
required but for assistant turns), it does, so schema-driven clients and fuzzers send what is served.
"""

from __future__ import annotations

import logging
import reprlib
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

Stop = Annotated[str, Field(min_length=1)]  # a stop string
log = logging.getLogger(__name__)
MAX_LOGPROBS = 20  # top alternatives per token (OpenAI: 20 for chat, 5 for completions; vLLM: 20)
INT64 = 2**63


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             408: "timeout_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
             503: "server_error"}

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
    for err in errors[:8]:
        where = ".".join(str(x) for x in err["loc"][1:]) or "body"  # loc[0] is "body"
        got = "" if err["type"] == "missing" else f" (got {reprlib.repr(err.get('input'))})"
        parts.append(f"{where}: {err['msg']}{got}")
    fields = errors[0]["loc"][1:]
    return APIError(400, "; ".join(parts), param=str(fields[0]) if fields else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_, e: RequestValidationError):
        return _validation_error(e).response()

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):  # unknown path (404), wrong method (405), body too large (413)
        return APIError(e.status_code, str(e.detail)).response()

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):  # a bug: logged, answered in OpenAI's shape
        log.exception("unhandled error in a request", exc_info=e)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()


def unsupported(field: str, why: str) -> APIError:
    return APIError(400, f"{field} is not supported: {why}", param=field, code="unsupported_parameter")


# ---------------------------------------------------------------------- bodies
class TextPart(BaseModel):
    type: Literal["text"]  # image, audio and file parts are refused (the model reads text only)
    text: str


class _Message(BaseModel):
    def text(self) -> str:
        """The content as one string: text parts joined with newlines."""
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)


class PromptMessage(_Message):
    role: Literal["system", "developer", "user"]
    content: str | list[TextPart]


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None


Message = Annotated[PromptMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionParams(BaseModel):
    """Fields shared by chat and text completions."""
    model: str
    n: int = Field(1, ge=1, le=8)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: Stop | list[Stop] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Refused unless neutral (refuse_unsupported, with a message that says why); the schema states the neutral
    # values only.
    tools: list[dict] | None = Field(None, json_schema_extra={"maxItems": 0})
    tool_choice: str | dict | None = Field(None, json_schema_extra={"anyOf": [{"const": "none"}, {"type": "null"}]})
    functions: list[dict] | None = Field(None, json_schema_extra={"maxItems": 0})
    function_call: str | dict | None = Field(None, json_schema_extra={"anyOf": [{"const": "none"}, {"type": "null"}]})
    response_format: dict | None = Field(None, json_schema_extra={"anyOf": [
        {"type": "object", "properties": {"type": {"const": "text"}}, "required": ["type"],
         "additionalProperties": False}, {"type": "null"}]})
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={"maxProperties": 0})
    presence_penalty: float = Field(0.0, json_schema_extra={"minimum": 0, "maximum": 0})
    frequency_penalty: float = Field(0.0, json_schema_extra={"minimum": 0, "maximum": 0})

    def refuse_unsupported(self) -> None:
        checks = [("tools", bool(self.tools), "tool calling is not implemented"),
                  ("tool_choice", self.tool_choice not in (None, "none"), "tool calling is not implemented"),
                  ("functions", bool(self.functions), "function calling is not implemented"),
                  ("function_call", self.function_call not in (None, "none"), "function calling is not implemented"),
                  ("response_format", self.response_format not in (None, {"type": "text"}),
                   "only {'type': 'text'} (structured output is not implemented)"),
                  ("logit_bias", bool(self.logit_bias), "logit biases are not implemented"),
                  ("presence_penalty", self.presence_penalty != 0, "only 0 (penalties are not implemented)"),
                  ("frequency_penalty", self.frequency_penalty != 0, "only 0 (penalties are not implemented)")]
        for field, bad, why in checks:
            if bad:
                raise unsupported(field, why)

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatBody(CompletionParams):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name for max_tokens; wins over it
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        """Top alternatives per generated token, or None for no log-probs."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionBody(CompletionParams):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0 with echo: the prompt's log-probs only (OpenAI's legacy use)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=8)

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.suffix:
            raise unsupported("suffix", "insertion (fill-in-the-middle) is not implemented")
        if self.best_of not in (None, self.n):
            raise unsupported("best_of", f"only best_of = n ({self.n}): ranking candidates is not implemented")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 scores the prompt only: it needs echo=true", param="max_tokens")
        if isinstance(self.prompt, list) and not self.prompt:
            raise APIError(400, "prompt is an empty list", param="prompt")
        if isinstance(self.prompt, list) and any(isinstance(p, list) and not p for p in self.prompt):
            raise APIError(400, "prompt holds an empty list of token ids", param="prompt")

    @property
    def limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprobs_k(self) -> int | None:
        return self.logprobs

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts of this body: strings or lists of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class TokenizeBody(BaseModel):
    """vLLM's /tokenize (what lm-evaluation-harness's remote tokenizer calls): text, or chat messages."""
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeBody(BaseModel):
    tokens: list[int]
    model: str | None = None
