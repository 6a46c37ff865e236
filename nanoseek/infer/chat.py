"""Text in, text out on the command line: batch completion (`nanoseek generate`) and an interactive chat
(`nanoseek chat`) that streams the reasoning (between <think> tags, shown dimmed) apart from the answer."""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from typing import TextIO

from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.text import ReasoningSplitter, readable, split_reasoning

DIM, RESET = "\033[2m", "\033[0m"


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """A user turn in the chat format (ends with the assistant tag), or the raw text after <bos>."""
    if chat:
        return tokenizer.apply_chat([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt, bos=True)


def complete(engine: Engine, prompts: list[str], params: SamplingParams, chat: bool = True) -> list[dict]:
    """Run all prompts through the engine (continuous batching); one result dict per prompt, in order."""
    tok = engine.tokenizer
    requests = [engine.add(encode_prompt(tok, p, chat), params) for p in prompts]
    engine.run()
    results = []
    for prompt, r in zip(prompts, requests):
        reasoning, content = split_reasoning(r.text, tok.template.reasoning_opener if chat else "")
        results.append(dict(prompt=prompt, text=r.text, reasoning=reasoning, content=content,
                            finish_reason=r.finish_reason, prompt_tokens=len(r.prompt),
                            completion_tokens=len(r.tokens)))
    return results


def stream(engine: Engine, ids: list[int], params: SamplingParams, out: TextIO, color: bool) -> str:
    """Generate one reply, printing reasoning (dimmed, then how long it took) and the answer as a person
    reads it (no <answer> tags) as they arrive; returns the whole text."""
    req = engine.add(ids, params)
    splitter, thinking, since, answer, shown = ReasoningSplitter(engine.tokenizer.template.reasoning_opener), \
        False, 0.0, "", ""

    def stop_thinking():
        out.write(f"{RESET if color else ''}\n[thought for {time.perf_counter() - since:.1f} s]\n")

    while not req.done:
        for u in engine.step():
            if u.request is not req or not u.text:
                continue
            reasoning, content = splitter.push(u.text)
            if reasoning:
                if not thinking:
                    out.write((DIM if color else "") + "[thinking] ")
                    thinking, since = True, time.perf_counter()
                out.write(reasoning)
            if content:
                if thinking:
                    stop_thinking()
                    thinking = False
                answer += content
                text = readable(answer, final=False)
                out.write(text[len(shown):])
                shown = text
            out.flush()
    if thinking:
        stop_thinking()
    out.write(readable(answer)[len(shown):] + "\n")
    if req.finish_reason == "length":
        out.write(f"[stopped at max_tokens={params.max_tokens}]\n")
    return req.text


def repl(engine: Engine, params: SamplingParams, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """Read user turns until EOF or /quit; /reset clears the history. The whole history is the prompt."""
    color = out.isatty()
    history: list[dict] = []
    out.write("nanoseek chat: type a message; /reset clears the history, /quit (or Ctrl-D) leaves.\n")
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or line.strip() == "/quit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = []
            out.write("(history cleared)\n")
            continue
        history.append({"role": "user", "content": text})
        ids = engine.tokenizer.apply_chat(history)
        room = engine.max_len - len(ids)
        if room < 1:
            out.write(f"(the conversation has {len(ids)} tokens, the context is {engine.max_len}: /reset)\n")
            history.pop()
            continue
        t0 = time.perf_counter()
        n0 = engine.stats["tokens"]
        reply = stream(engine, ids, replace(params, max_tokens=min(params.max_tokens, room)), out, color)
        reasoning, content = split_reasoning(reply, engine.tokenizer.template.reasoning_opener)
        history.append({"role": "assistant", "content": content})
        rate = (engine.stats["tokens"] - n0) / (time.perf_counter() - t0)
        out.write(f"{DIM if color else ''}({rate:.0f} tok/s){RESET if color else ''}\n")
