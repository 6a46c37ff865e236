"""Engine output in OpenAI's response shapes: choices, stream chunks, usage and log-probs.

A chat completion is split as in DeepSeek's API: `reasoning_content` (between <think> and </think>) apart
from `content` (the answer); text completions return the raw `text` (with `echo`, the prompt's text first).
Log-probs are the model's own (engine.Logprob) for every generated token but a stop id that ended the
request (it is not part of the text either); with `echo`, the prompt's tokens come first, the first of them
without a log-prob (None), as in OpenAI's legacy completions. Chat: `{"content": [{token, logprob, bytes,
top_logprobs: [...]}]}`; completions: `{tokens, token_logprobs, top_logprobs: [{token: logprob}],
text_offset}`. The models at the end document these shapes in the OpenAPI schema (the server builds dicts).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from nanoseek.infer.engine import Logprob
from nanoseek.infer.engine import Request as EngineRequest
from nanoseek.infer.text import ReasoningSplitter, split_reasoning
from nanoseek.infer.worker import Delta


def shown(r: EngineRequest, tokens, logprobs) -> list[tuple[int, Logprob]]:
    """(token, log-probs) pairs of generated tokens that the text shows: a stop id is left out."""
    return [(t, lp) for t, lp in zip(tokens, logprobs) if t not in r.stop_ids]


class Choice:
    """One choice's text and log-probs, built from its deltas; `chunk_piece` renders one delta for streaming,
    `final` the whole choice."""

    def __init__(self, index: int, request: EngineRequest, chat: bool, tokenizer, echo: str | None = None,
                 prompt_only: bool = False):
        self.index, self.request, self.chat, self.tok = index, request, chat, tokenizer
        self.prompt_only = prompt_only  # max_tokens=0 with echo: the generated token is not shown
        self.text, self.offset = "", 0
        self.opened = tokenizer.template.reasoning_opener if chat else ""  # R1's prompt opens <think>
        self.splitter = ReasoningSplitter(self.opened) if chat else None
        self.echo = echo  # completions with echo: the prompt's text, sent before the completion
        self.pairs: list[tuple[int, Logprob]] = []  # generated tokens shown, with their log-probs

    @property
    def wants_logprobs(self) -> bool:
        return self.request.params.logprobs is not None

    def _token(self, t: int) -> str:
        """The token's text; a token that holds part of a UTF-8 character is written `bytes:\\xNN...` (as OpenAI
        and vLLM do), so distinct byte tokens never share a key in `top_logprobs`."""
        text = self.tok.decode([t])
        if "\ufffd" in text:
            raw = self.tok.token_bytes(t)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return text

    def _add_logprobs(self, pairs: list[tuple[int, Logprob | None]], out: dict) -> None:
        for t, lp in pairs:
            token = self._token(t)
            if self.chat:
                out["content"].append({
                    "token": token, "logprob": lp[0], "bytes": list(self.tok.token_bytes(t)),
                    "top_logprobs": [{"token": self._token(i), "logprob": v, "bytes": list(self.tok.token_bytes(i))}
                                     for i, v in zip(lp[1], lp[2])]})
                continue
            out["tokens"].append(token)
            out["token_logprobs"].append(None if lp is None else lp[0])
            out["top_logprobs"].append(None if lp is None else {self._token(i): v for i, v in zip(lp[1], lp[2])})
            out["text_offset"].append(self.offset)
            self.offset += len(token)

    def _prompt_logprobs(self, out: dict) -> None:
        r = self.request
        if r.prompt_logprobs is not None:
            self._add_logprobs(list(zip(r.prompt, r.prompt_logprobs)), out)

    def start(self) -> dict | None:
        """The first piece of a chat stream: the role."""
        return {"delta": {"role": "assistant", "content": ""}, "logprobs": None} if self.chat else None

    def _empty(self) -> dict:
        return {"content": []} if self.chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                                  "text_offset": []}

    def chunk_piece(self, d: Delta) -> dict | None:
        """A streamed delta (None when it carries nothing: a held-back partial tag and no log-probs)."""
        if self.prompt_only:  # nothing generated is shown, and it ended at its length of 0
            d = Delta(d.request, (), "", (), "length" if d.finish_reason in ("stop", "length") else d.finish_reason)
        lps, echo = None, self.echo or ""  # the echoed prompt goes with the first delta (after the prefill)
        self.echo = None
        if self.wants_logprobs:
            lps = self._empty()
            if echo:
                self._prompt_logprobs(lps)
            self._add_logprobs(shown(self.request, d.tokens, d.logprobs), lps)
        if self.chat:
            reasoning, content = self.splitter.push(d.text)
            piece = {"delta": {k: v for k, v in (("reasoning_content", reasoning), ("content", content)) if v}}
            has = bool(piece["delta"])
        else:
            piece, has = {"text": echo + d.text}, bool(echo + d.text)
        if lps is not None and not any(lps.values()):
            lps = None
        if not (has or lps or d.finish_reason):
            return None
        return {**piece, "logprobs": lps, "finish_reason": d.finish_reason}

    def add(self, d: Delta) -> None:
        if self.prompt_only:
            return
        self.text += d.text
        if self.wants_logprobs:
            self.pairs += shown(self.request, d.tokens, d.logprobs)

    def final(self) -> dict:
        r, lps = self.request, None
        if self.wants_logprobs:
            lps = self._empty()
            if self.echo is not None:
                self._prompt_logprobs(lps)
            self._add_logprobs(self.pairs, lps)
        if not self.chat:
            return {"index": self.index, "text": (self.echo or "") + self.text, "logprobs": lps,
                    "finish_reason": "length" if self.prompt_only else r.finish_reason}
        reasoning, content = split_reasoning(self.text, self.opened)
        return {"index": self.index, "message": {"role": "assistant", "content": content,
                                                 "reasoning_content": reasoning},
                "logprobs": lps, "finish_reason": r.finish_reason}


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict:
    """Token counts: each prompt once, whatever the number of choices (as OpenAI counts)."""
    prompt = sum(len(p) for p in prompts)
    completion = sum(0 if c.prompt_only else len(c.request.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------- the shapes, for the OpenAPI schema
Finish = Literal["stop", "length"]  # an error or abort mid-stream is an ErrorBody event instead


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class TextLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]  # None: the echoed prompt's first token
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class _Head(BaseModel):
    id: str
    created: int
    model: str


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str
    reasoning_content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: Finish


class ChatCompletion(_Head):
    object: Literal["chat.completion"]
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):  # each key only when it has something
    role: Literal["assistant"] = "assistant"
    content: str = ""
    reasoning_content: str = ""


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: Finish | None


class ChatCompletionChunk(_Head):
    object: Literal["chat.completion.chunk"]
    choices: list[ChatChunkChoice]  # none in the last chunk, with include_usage
    usage: Usage | None = None


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: Finish


class TextCompletion(_Head):
    object: Literal["text_completion"]
    choices: list[TextChoice]
    usage: Usage


class TextChunkChoice(TextChoice):
    finish_reason: Finish | None


class TextCompletionChunk(_Head):
    object: Literal["text_completion"]
    choices: list[TextChunkChoice]
    usage: Usage | None = None


def event_stream(chunk: type[BaseModel], error: type[BaseModel]) -> dict:
    """The text/event-stream content of a streamed 200 (OpenAPI 3.2's `itemSchema`, one server-sent event):
    `data:` holds a `chunk` or an `error` as JSON, or is `[DONE]` (the last event)."""
    ref = "#/components/schemas/{}".format
    data = {"type": "string", "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [{"$ref": ref(chunk.__name__)}, {"$ref": ref(error.__name__)}]}}
    return {"text/event-stream": {"itemSchema": {"type": "object", "required": ["data"], "properties": {
        "data": {"if": {"const": "[DONE]"}, "else": data}}}}}


def stream_components(*models: type[BaseModel]) -> dict:
    """The component schemas of `models` and of what they hold, for event_stream's references."""
    _, defs = models_json_schema([(m, "serialization") for m in models], ref_template="#/components/schemas/{model}")
    return defs["$defs"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["ok", "draining", "dead"]  # 200 when ok, else 503
    model: str
    engine_alive: bool
    seconds_since_step: float
    running: int
    queued: int
    in_flight: int
    steps: int
    prefill_tokens: int
    tokens: int
    drafted: int
    accepted: int
    acceptance_rate: float


class Tokenized(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class Detokenized(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):  # and the tokenizer's special tokens (bos_token, eos_token, ...)
    tokenizer_class: str
    pad_token: str | None
    chat_template: str | None
    model_max_length: int
    vocab_size: int
