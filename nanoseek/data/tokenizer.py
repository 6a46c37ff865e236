"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), with the chat format of the R1 stage.

Pipeline: no normalizer (so text round-trips byte for byte: no NFC, no lower-casing), a regex split,
then GPT-2's byte-to-unicode map, BPE over bytes, and the byte-level decoder. Every one of the 256 bytes
is in the initial alphabet, so any UTF-8 string (Chinese, emoji, combining marks, NUL and control
characters) encodes without <unk> and `decode(encode(s)) == s`.

The split regex (`SPLIT_PATTERN`) is GPT-4's, changed in two ways for arithmetic:
  * every digit is its own pre-token (as in Llama 1 / DeepSeek-LLM), so numbers are never merged and
    place values line up token by token;
  * an XML-like tag (`<answer>`, `</answer>`, optionally after one space) is one pre-token, so BPE can
    learn it as one token.

Special tokens (ids 0..5, in this order; id 0 = bos and 1 = eos as in `ModelConfig`):
    <|begin_of_text|>  <|end_of_text|>  <|user|>  <|assistant|>  <think>  </think>
`<answer>` / `</answer>` are deliberately plain text, as in R1: rewards parse them from decoded text, and
the model may write them anywhere. A special-token string that occurs in input text is encoded as that
special token.

Chat format (`render_chat`; the built-in corpus documents use it verbatim):
    <|begin_of_text|><|user|>{prompt}<|assistant|><think>{reasoning}</think>{answer text}<|end_of_text|>
Turns alternate user / assistant; each assistant turn ends with eos, the stop token for generation. The
format has no system role: R1's advice is to put every instruction in the user prompt, and that is the rule
for system messages here: those that open the conversation are joined, each followed by a blank line, and
put before the first user turn's text (`<|user|>{system}\\n\\n{prompt}`); a system message after that is
an error. The packed training stream is `bos doc eos bos doc eos ...`, so a prompt rendered here begins
exactly as every training document does (without bos, a small model trained on the stream mis-reads prompts
that start at position 0: 0% vs a correct answer, seen on the demo model).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

BOS, EOS, USER, ASSISTANT, THINK, END_THINK = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<think>", "</think>")
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK)
SPLIT_PATTERN = (r" ?</?[A-Za-z_]+>|\p{N}|'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}<]?\p{L}+"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
FILE_NAME = "tokenizer.json"
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))


def render_chat(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Messages [{"role": "system"|"user"|"assistant", "content": str, "reasoning"?: str}] -> chat text.

    An assistant message with a "reasoning" key is written `<think>{reasoning}</think>{content}`; without
    one, its content is written as is (it may already hold the think block). With add_generation_prompt
    and a final user turn, the text ends with `<|assistant|>`, ready for the model to write `<think>`.
    """
    parts, system = [BOS], ""
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"messages[{i}].role={role!r}: allowed roles are 'system', 'user' and 'assistant'")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        previous = messages[i - 1]["role"] if i else None
        if role == "system":
            if previous not in (None, "system"):
                raise ValueError(f"messages[{i}]: a system message must come before the conversation's first "
                                 "user turn (it is put in front of that turn's text)")
            system += content + "\n\n"
        elif previous == role:
            raise ValueError(f"messages[{i}]: roles must alternate user/assistant, got two {role!r} turns")
        elif role == "user":
            parts.append(USER + system + content)
            system = ""
        elif system:
            raise ValueError(f"messages[{i}]: system messages must be followed by a user turn, not an assistant's")
        else:
            think = f"{THINK}{m['reasoning']}{END_THINK}" if "reasoning" in m else ""
            parts.append(ASSISTANT + think + content + EOS)
    if system:
        raise ValueError("the system messages are not followed by a user turn")
    if add_generation_prompt and messages and messages[-1]["role"] == "user":
        parts.append(ASSISTANT)
    return "".join(parts)


# A Jinja rendering of `render_chat` for `tokenizer.apply_chat_template` (hf.export writes it), with its rule
# for system messages (those that open the conversation go before the first user turn's text)
CHAT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if not loop.first and messages[loop.index0 - 1]['role'] != 'system' %}"
    "{{ raise_exception('a system message must come before the first user turn') }}{% endif %}"
    "{% set ns.system = ns.system + m['content'] + '\\n\\n' %}"
    "{% elif m['role'] == 'user' %}<|user|>{{ ns.system }}{{ m['content'] }}{% set ns.system = '' %}"
    "{% else %}<|assistant|>{% if m['reasoning'] is defined %}<think>{{ m['reasoning'] }}</think>{% endif %}"
    "{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt and messages[-1]['role'] == 'user' %}<|assistant|>{% endif %}")


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-to-unicode map, inverted: the printable bytes stand for themselves, the others are the
    characters from U+0100 on, in byte order (what `pre_tokenizers.ByteLevel` writes into the vocabulary)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


_BYTE_OF = _byte_level_chars()


def _texts_for_training(texts: Iterable[str]) -> Iterator[str]:
    # BPE training does not extract special tokens, so cut them out; merges never span them anyway
    for text in texts:
        yield from (piece for piece in _SPECIAL_RE.split(text) if piece)


class Tokenizer:
    """A trained byte-level BPE: encode / decode, batch encode, special-token ids, chat encoding."""

    def __init__(self, hf_tokenizer, path: Path | None = None):
        self._tok = hf_tokenizer
        self.path = path  # the tokenizer.json it was loaded from / saved to
        ids = [hf_tokenizer.token_to_id(s) for s in SPECIAL_TOKENS]
        if None in ids:
            missing = [s for s, i in zip(SPECIAL_TOKENS, ids) if i is None]
            raise ValueError(f"tokenizer{' ' + str(path) if path else ''} lacks the special tokens {missing}")
        self.bos_id, self.eos_id, self.user_id, self.assistant_id, self.think_id, self.end_think_id = ids
        self.special_ids = frozenset(ids)

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *,
              min_frequency: int = 2) -> Tokenizer:
        """Train on texts (for files: data.documents.iter_documents of each).

        The vocabulary holds at most vocab_size tokens (6 special + 256 bytes + merges); it is smaller when
        the text offers fewer merges of at least min_frequency occurrences. Saved as out_dir/tokenizer.json.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} must be >= {floor} (6 special tokens + 256 bytes)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_texts_for_training(texts), trainer)
        out = cls(tok)
        if out_dir is not None:
            out.save(out_dir)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load DIR/tokenizer.json (or a tokenizer.json path)."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no tokenizer at {file} (make one with `nanoseek tokenizer`)")
        return cls(HFTokenizer.from_file(str(file)), file)

    def save(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / FILE_NAME
        self._tok.save(str(self.path))
        return self.path

    # ------------------------------------------------------------------ use
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def sha256(self) -> str:
        """Hash of the serialized tokenizer (recorded in shard indexes)."""
        return hashlib.sha256(self._tok.to_str().encode()).hexdigest()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (parallel in Rust; no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Exact inverse of encode for whole sequences; special tokens are kept as their strings."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_bytes(self, i: int) -> bytes:
        """The bytes token i stands for (a byte-level token may hold part of a UTF-8 character)."""
        piece = self._tok.id_to_token(int(i)) or ""
        if all(c in _BYTE_OF for c in piece):
            return bytes(_BYTE_OF[c] for c in piece)
        return self.decode([i]).encode()

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the bytes of text one token covers (its vocabulary string's UTF-8 length), so a
        text of n bytes has at least n / max_token_bytes tokens."""
        return max(len(t.encode()) for t in self._tok.get_vocab(with_added_tokens=True))

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `render_chat(messages, add_generation_prompt)` (see the module docstring)."""
        return self.encode(render_chat(messages, add_generation_prompt))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"
