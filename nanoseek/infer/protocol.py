"""The OpenAI dialect the server speaks: request bodies, the parameters it refuses, errors in OpenAI's shape.

Bodies follow OpenAI's names and ranges (`top_k` is an extension, as in vLLM). Unknown fields are ignored, as
OpenAI clients send many; parameters nanoseek cannot honour (`tools`, `response_format` other than text,
`logit_bias`, penalties, non-text content parts, ...) are refused with a 400 that names the field, never
silently dropped. Chat `content` may be a string or a list of `{"type": "text", "text": ...}` parts (joined
with newlines, as vLLM does); a `developer` message is a `system` message. A completions `prompt` may be a
string, a list of strings, a list of token ids (used verbatim, no BOS added) or a list of such lists.
Bodies are strict (no "2" for 2, no 0 for false) and the schema states what is served (the neutral values of
refused parameters, text parts only, content required but for assistant turns, the rules between fields, the
vocabulary's bounds): a body is accepted iff it is schema-valid, but for what JSON Schema cannot state, the
context length (400 `context_length_exceeded`) and the conversation's order (400 `invalid_conversation`).
Every error is answered in OpenAI's shape (ErrorBody) with the status the schema documents.
"""

from __future__ import annotations

import logging
import reprlib
from typing import Annotated, Literal

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
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

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ErrorDetail(BaseModel):
    message: str
    type: Literal["invalid_request_error", "authentication_error", "not_found_error", "timeout_error",
                  "rate_limit_error", "server_error"]
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What every error answers: APIError.body()."""
    error: ErrorDetail


WHY = {400: "An invalid body or parameter; also a prompt over the context (`context_length_exceeded`) or a "
            "conversation the chat template refuses (`invalid_conversation`)",
       401: "No `Authorization: Bearer <key>` with the server's API key", 404: "The model is not the one served",
       408: "The request did not finish within the server's request_timeout",
       413: "The body exceeds the server's max_body_bytes",
       429: "max_concurrent requests are in flight; retry shortly",
       503: "The server is shutting down, or its engine has stopped"}


def errors(*statuses: int) -> dict:
    """FastAPI `responses=` documenting these error statuses, each with ErrorBody."""
    return {s: {"model": ErrorBody, "description": WHY[s]} for s in statuses}


BOUNDS = {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"}


def conform(schema: dict, vocabulary: dict[str, int]) -> dict:
    """FastAPI's OpenAPI schema as served: without its 422 (invalid bodies get 400, documented by `errors`), and
    token ids (marked `x-vocabulary: model|tokenizer`) bounded by `vocabulary[...]`, integral bounds exact
    integers; modified in place."""
    for item in schema["paths"].values():
        for operation in item.values():
            operation["responses"].pop("422", None)
    for name in ("HTTPValidationError", "ValidationError"):
        schema.get("components", {}).get("schemas", {}).pop(name, None)

    def bound(node):
        if isinstance(node, dict):
            if (which := node.pop("x-vocabulary", None)) is not None:
                node["maximum"] = vocabulary[which] - 1
            for key in BOUNDS & node.keys():  # FastAPI writes bounds as floats: 2**63's neighbours would blur
                if isinstance(node[key], float) and node[key].is_integer():
                    node[key] = int(node[key])
            for value in node.values():
                bound(value)
        elif isinstance(node, list):
            for value in node:
                bound(value)
    bound(schema)
    return schema


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
    async def http_error(_, e: HTTPException):  # unknown path (404), wrong method (405, with Allow), body too large
        return APIError(e.status_code, str(e.detail)).response(e.headers)

    @app.exception_handler(Exception)
    async def server_error(_, e: Exception):  # a bug: logged, answered in OpenAI's shape
        log.exception("unhandled error in a request", exc_info=e)
        return APIError(500, f"internal error: {type(e).__name__}: {e}", code="internal_error").response()


def unsupported(field: str, why: str) -> APIError:
    return APIError(400, f"{field} is not supported: {why}", param=field, code="unsupported_parameter")


# ---------------------------------------------------------------------- bodies
TOKEN_ID = {"type": "integer", "minimum": 0, "x-vocabulary": "model"}  # conform() sets its maximum


def _unless(field: str, neutral: dict, then: dict, required: tuple = ()) -> dict:
    """A rule between fields: `field` is absent or matches `neutral`, or the body matches `then`."""
    return {"anyOf": [{"properties": {field: neutral}}, {"properties": then, "required": list(required)}]}


def _integral(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds):
    """JSON Schema's integer within `bounds` (Field's ge, lt, ...): 2 and 2.0, not "2" nor true. The bounds come
    before the validator, or pydantic's schema would write them as `ge`, not `minimum`."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Int = integer()


class Body(BaseModel):
    model_config = ConfigDict(strict=True)  # integers are `integer(...)`


class TextPart(Body):
    type: Literal["text"]  # image, audio and file parts are refused (the model reads text only)
    text: str


class _Message(Body):
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
CONVERSATION = "a conversation the chat template accepts, ending with the user's turn (else 400 invalid_conversation)"
FITS = "prompt + max_tokens must fit the context (else 400 context_length_exceeded)"


class StreamOptions(Body):
    include_usage: bool = False


class CompletionParams(Body):
    """Fields shared by chat and text completions."""
    model: str
    n: integer(ge=1, le=8) = 1
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: integer(ge=0) = 0
    max_tokens: integer(ge=1) | None = Field(None, description=FITS)
    seed: integer(ge=-INT64, lt=INT64) | None = None
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
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _unless("top_logprobs", {"type": "null"}, {"logprobs": {"const": True}}, ("logprobs",))]})
    messages: list[Message] = Field(min_length=1, description=CONVERSATION)
    max_completion_tokens: integer(ge=1) | None = None  # OpenAI's newer name for max_tokens; wins over it
    logprobs: bool = False
    top_logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None

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
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _unless("max_tokens", {"not": {"const": 0}}, {"echo": {"const": True}}, ("echo",)),
        {"anyOf": [{"properties": {"best_of": {"type": "null"}}},  # best_of = n (n is 1 unless given)
                   {"properties": {"best_of": {"const": 1}, "n": {"const": 1}}},
                   *({"properties": {"best_of": {"const": k}, "n": {"const": k}}, "required": ["best_of", "n"]}
                     for k in range(2, 9))]}]})
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(json_schema_extra={"anyOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1},
        {"type": "array", "items": TOKEN_ID, "minItems": 1},
        {"type": "array", "items": {"type": "array", "items": TOKEN_ID, "minItems": 1}, "minItems": 1}]})
    # 0 with echo: the prompt's log-probs only (OpenAI's legacy use)
    max_tokens: integer(ge=0) | None = Field(None, description=FITS)
    logprobs: integer(ge=0, le=MAX_LOGPROBS) | None = None
    echo: bool = False
    suffix: str | None = Field(None, json_schema_extra={"anyOf": [{"const": ""}, {"type": "null"}]})
    best_of: integer(ge=1, le=8) | None = None

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


class TokenizeBody(Body):
    """vLLM's /tokenize (what lm-evaluation-harness's remote tokenizer calls): exactly one of `prompt` (text)
    and `messages` (a chat), neither null."""
    model_config = ConfigDict(json_schema_extra={"oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}]})
    prompt: str = Field(None, json_schema_extra=lambda s: s.pop("default"))  # type: ignore[assignment]
    messages: list[Message] = Field(None, min_length=1, description=CONVERSATION,  # type: ignore[assignment]
                                    json_schema_extra=lambda s: s.pop("default"))
    add_special_tokens: bool = True
    model: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data):
        if isinstance(data, dict) and ("prompt" in data) == ("messages" in data):
            raise ValueError("send exactly one of prompt and messages")
        return data


class DetokenizeBody(Body):
    tokens: list[Int] = Field(json_schema_extra={"items": {**TOKEN_ID, "x-vocabulary": "tokenizer"}})
    model: str | None = None
