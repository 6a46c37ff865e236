"""Chat templates: a conversation rendered to text the way `transformers`' `apply_chat_template` renders it.

A template is the Jinja source a model folder brings (`chat_template` in tokenizer_config.json, or
chat_template.jinja). It runs in a sandbox (`ImmutableSandboxedEnvironment`, `trim_blocks`, `lstrip_blocks`,
the `loopcontrols` extension) and sees what transformers passes: `messages`, `add_generation_prompt`,
`tools`/`documents` (None here), the special-token strings (`bos_token`, `eos_token`, ...) and any extra
keyword. Its globals are `raise_exception` (a template's own refusal, surfaced as ValueError),
`strftime_now`, a JSON `tojson` filter, `dict` and a `namespace` that refuses underscore names. As in
transformers, keys whose value is None are dropped from each message, and a message's reasoning, given as
`reasoning_content`, `thinking` or `reasoning`, is passed under all three names.

nanoseek's own format (`CHAT_TEMPLATE`, what `nanoseek tokenizer` models use):
    <|begin_of_text|><|user|>{prompt}<|assistant|><think>{reasoning}</think>{answer text}<|end_of_text|>
The format has no system role: R1's advice is to put every instruction in the user prompt, so system
messages that open the conversation are joined, each followed by a blank line, and put before the first
user turn's text; a system message after that is refused.
"""

from __future__ import annotations

import functools
import json
import sys
from datetime import datetime

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

BOS, EOS, USER, ASSISTANT, THINK, END_THINK = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<think>", "</think>")
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not loop.first and messages[loop.index0 - 1]['role'] != 'system' %}"
    "{{ raise_exception('a system message must come before the first user turn') }}{% endif %}"
    "{% set ns.system = ns.system + m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}<|user|>{{ ns.system }}{{ m['content'] }}{% set ns.system = '' %}"
    "{% elif m['role'] == 'assistant' %}<|assistant|>{% if m['reasoning_content'] is defined %}"
    "<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('role ' + m['role'] + ' is not one of system, user, assistant') }}{% endif %}"
    "{% endfor %}{% if ns.system %}{{ raise_exception('the system messages are not followed by a user turn') }}"
    "{% endif %}{% if add_generation_prompt and messages[-1]['role'] == 'user' %}<|assistant|>{% endif %}")

# For a folder that brings no template: DeepSeek-LLM's plain "User: ... Assistant:" layout
PLAIN_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }}\n\n"
    "{% else %}Assistant: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
ROLES = ("system", "user", "assistant", "tool")


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` without underscore attributes (no way to CPython internals)."""

    def __init__(*args, **kwargs):
        self, attrs = args[0], dict(*args[1:], **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=lambda *a, **k: dict(*a, **k), namespace=_Namespace)
    return env


def opened_reasoning(text: str) -> str:
    """The think block a text leaves open, from its last <think> on ('' when none is open)."""
    start = text.rfind(THINK)
    return text[start:] if start >= 0 and END_THINK not in text[start:] else ""


def plain_messages(messages) -> list[dict]:
    """Messages as the template sees them: a list of dicts with a known role; None values dropped; the
    reasoning under each of its names. Errors name the message and the rule."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}] must be an object with 'role' and 'content', got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise ValueError(f"messages[{i}].role={m.get('role')!r}: allowed roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) and not (m["role"] == "assistant" and m.get("content") is None):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m.get('content')).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        out.append(m if reasoning is None else {**m, **dict.fromkeys(REASONING_FIELDS, reasoning)})
    return out


class ChatTemplate:
    """A compiled template plus the special-token strings it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str = "chat template"):
        self.source, self.special_tokens, self.origin = source, dict(special_tokens), origin
        try:
            self._compiled = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{origin}: not a valid Jinja template (line {e.lineno}: {e.message})") from None

    @classmethod
    def plain(cls, special_tokens: dict[str, str], origin: str) -> ChatTemplate:
        """The fallback for a folder without a template; says so once, on stderr."""
        print(f"nanoseek: {origin} has no chat template; using a plain 'User: ... Assistant:' rendering",
              file=sys.stderr)
        return cls(PLAIN_TEMPLATE, special_tokens, f"{origin} (plain fallback)")

    def render(self, messages, add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as text; a template that refuses it (raise_exception) or fails gives ValueError."""
        try:
            return self._compiled.render(messages=plain_messages(messages), tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.origin} refused the conversation: {e}") from None
        except (TypeError, KeyError, AttributeError) as e:  # e.g. a template that adds None to a string
            raise ValueError(f"{self.origin} failed on the conversation: {type(e).__name__}: {e}") from None

    @functools.cached_property
    def reasoning_opener(self) -> str:
        """The think block the generation prompt opens ('' for most templates). R1's ends the prompt with
        `<think>\\n`, so the completion starts inside the reasoning; `reasoning_opener + completion` is what a
        model that opens <think> itself writes, and what the reasoning views and the rewards read."""
        probe = [{"role": "user", "content": "?"}]
        prompt, turn = self.render(probe, True), self.render(probe, False)
        return opened_reasoning(prompt[len(turn):] if prompt.startswith(turn) else prompt)

    def document(self, messages) -> str:
        """A conversation as a training document: rendered whole, without the bos / eos frame that the
        shard writer puts around every document."""
        text = self.render(messages, add_generation_prompt=False)
        bos, eos = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        return text.removeprefix(bos or "").removesuffix(eos or "")


NANOSEEK_CHAT = ChatTemplate(CHAT_TEMPLATE, {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS}, "nanoseek's chat format")
