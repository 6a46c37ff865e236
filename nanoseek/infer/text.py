"""From generated token ids to text: incremental detokenization with stop strings, and the split of a
completion into reasoning (between <think> and </think>) and answer, as DeepSeek's API returns them
(`reasoning_content` apart from `content`).
"""

from __future__ import annotations

from nanoseek.data.chat_template import END_THINK, THINK


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest proper prefix of `tag` that `text` ends with."""
    return max((k for k in range(1, len(tag)) if text.endswith(tag[:k])), default=0)


class TextStream:
    """Decode a growing list of ids into text deltas.

    push(ids) returns only text that can no longer change: a trailing incomplete UTF-8 character (decoded
    as U+FFFD) and any tail that could be the start of a stop string are held back. When a stop string
    appears, the text is cut before it and `stopped` is set. Ids in `skip_ids` (end-of-text) are not shown.
    `lazy` (a reader of the final text only, and no stop strings): push() keeps the ids and returns nothing,
    finish() decodes them once (a push decodes all the ids so far: per token, that work grows with the text).
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_ids: frozenset[int] = frozenset(),
                 lazy: bool = False):
        self.tokenizer, self.stop, self.skip_ids = tokenizer, stop, skip_ids
        self.lazy = lazy and not stop
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def push(self, ids: list[int], final: bool = False) -> str:
        self.ids.extend(i for i in ids if i not in self.skip_ids)
        if self.lazy and not final:
            return ""
        full = self.tokenizer.decode(self.ids)
        cut = min((i for i in (full.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            full, final, self.stopped = full[:cut], True, True
        if not final:
            if full.endswith("\ufffd"):
                full = full[:-1]
            hold = max((_partial_suffix(full, s) for s in self.stop), default=0)
            full = full[: len(full) - hold]
        delta = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += delta
        return delta

    def finish(self) -> str:
        """The held-back tail, once generation has ended."""
        return "" if self.stopped else self.push([], final=True)


def split_reasoning(text: str, opened: str = "") -> tuple[str, str]:
    """(reasoning, content): a completion that opens with <think> has its reasoning up to </think> (or to
    the end, while still thinking); the rest is the answer. `opened` is the think block the prompt already
    opened (`ChatTemplate.reasoning_opener`, R1's `<think>\\n`): the completion continues it."""
    if opened:
        reasoning, content = split_reasoning(opened + text)
        return reasoning.removeprefix(split_reasoning(opened)[0]), content
    stripped = text.lstrip()
    if not stripped.startswith(THINK):
        return "", text
    body = stripped[len(THINK):]
    reasoning, sep, content = body.partition(END_THINK)
    return reasoning, content.lstrip() if sep else ""


_ANSWER_TAGS = ("<answer>", "</answer>")


def readable(content: str, final: bool = True) -> str:
    """The answer as a person reads it: R1-Zero's <answer> tags dropped, the text between them kept. While
    streaming (final False), a tail that may still become a tag is held back. The web page does the same."""
    for tag in _ANSWER_TAGS:
        content = content.replace(tag, "")
    hold = 0 if final else max(_partial_suffix(content, tag) for tag in _ANSWER_TAGS)
    return content[: len(content) - hold]


class ReasoningSplitter:
    """Streaming split_reasoning: push(delta) -> (reasoning delta, content delta)."""

    def __init__(self, opened: str = ""):
        self.text, self.content = opened, ""  # the prompt's opened think block counts as said, not shown
        self.reasoning = split_reasoning(opened)[0]

    def push(self, delta: str) -> tuple[str, str]:
        self.text += delta
        head = self.text.lstrip()
        if THINK.startswith(head):
            return "", ""  # may still become <think>
        reasoning, content = split_reasoning(self.text)
        if head.startswith(THINK) and END_THINK not in head:  # hold back what may become </think>
            reasoning = reasoning[: len(reasoning) - _partial_suffix(reasoning, END_THINK)]
        r, c = reasoning[len(self.reasoning):], content[len(self.content):]
        self.reasoning, self.content = reasoning, content
        return r, c
