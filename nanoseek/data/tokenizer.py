"""Tokenizers: any Hugging Face `tokenizer.json` a model folder brings, and nanoseek's own byte-level BPE.

A folder's tokenizer is used as it is. Its special tokens come from the folder's files, as transformers
reads them: `bos_token` / `eos_token` / `pad_token` from tokenizer_config.json (a string or an AddedToken
object), and the ids in config.json and generation_config.json (`eos_token_id` may be a list: every one of
them stops generation). The chat template is chat_template.jinja or tokenizer_config.json's
`chat_template` (see data/chat_template.py); a folder with neither falls back to a plain rendering.

nanoseek's own tokenizer (`Tokenizer.train`): no normalizer (text round-trips byte for byte), a regex split,
GPT-2's byte-to-unicode map, BPE over bytes, and the byte-level decoder. Every one of the 256 bytes is in
the initial alphabet, so any UTF-8 string encodes without <unk> and `decode(encode(s)) == s`. The split
regex (`SPLIT_PATTERN`) is GPT-4's, changed in two ways for arithmetic: every digit is its own pre-token
(as in Llama 1 / DeepSeek-LLM), and an XML-like tag (`<answer>`, optionally after one space) is one
pre-token. Added tokens (ids 0..5, in this order; bos 0 and eos 1 as in `ModelConfig`):
    <|begin_of_text|>  <|end_of_text|>  <|user|>  <|assistant|>  <think>  </think>
`<think>` / `</think>` are added but not "special", as in DeepSeek-R1's tokenizer, so a decoder that skips
special tokens (TRL's completions) keeps them; tokenizers trained before made them special and still load.
`<answer>` / `</answer>` are plain text, as in R1. Its chat format is `chat_template.CHAT_TEMPLATE`. The
packed training stream is `bos doc eos bos doc eos ...`, so a prompt rendered with bos begins exactly as
every training document does (without bos, a small model trained on the stream mis-reads prompts that start
at position 0: 0% vs a correct answer, seen on the demo model).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from nanoseek.data.chat_template import BOS, CHAT_TEMPLATE, END_THINK, EOS, SPECIAL_TOKENS, THINK, ChatTemplate

SPLIT_PATTERN = (r" ?</?[A-Za-z_]+>|\p{N}|'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}<]?\p{L}+"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
FILE_NAME = "tokenizer.json"
CONFIG_NAME = "tokenizer_config.json"
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS))


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


def _token_string(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    return value.get("content") if isinstance(value, dict) else value


def _ids(value) -> list[int]:
    return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


def _read_json(file: Path) -> dict:
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


class Tokenizer:
    """A `tokenizers` tokenizer with its special ids and chat template: encode / decode, chat encoding."""

    def __init__(self, hf_tokenizer, path: Path | None = None, config: dict | None = None,
                 model_ids: tuple[dict, ...] = (), template: str | None = None):
        """config: tokenizer_config.json's fields; model_ids: config.json / generation_config.json dicts with
        bos_token_id / eos_token_id; template: the Jinja source (else config's `chat_template`)."""
        self._tok, self.path = hf_tokenizer, path  # path: the tokenizer.json it was loaded from / saved to
        where = f"tokenizer {path}" if path else "tokenizer"
        native = config is None and all(hf_tokenizer.token_to_id(t) is not None for t in SPECIAL_TOKENS)
        if native:  # nanoseek's own: its special tokens and chat format
            config = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "chat_template": CHAT_TEMPLATE}
        self.config = dict(config or {})
        strings = {k: _token_string(self.config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        from_model = {k: [i for d in model_ids for i in _ids(d.get(k))] for k in ("bos_token_id", "eos_token_id")}
        for key, ids in (("bos_token", from_model["bos_token_id"]), ("eos_token", from_model["eos_token_id"])):
            if strings[key] is None and ids:
                strings[key] = hf_tokenizer.id_to_token(ids[0])
        for key, token in strings.items():
            if token is not None and hf_tokenizer.token_to_id(token) is None:
                raise ValueError(f"{where}: {key} {token!r} is not in its vocabulary")
        if strings["eos_token"] is None:
            raise ValueError(f"{where}: no end-of-sequence token (tokenizer_config.json has no eos_token, and "
                             "config.json / generation_config.json no eos_token_id)")
        self.special_tokens = {k: v for k, v in strings.items() if v is not None}  # what templates see
        self.bos_id = hf_tokenizer.token_to_id(strings["bos_token"]) if strings["bos_token"] else None
        self.eos_id = hf_tokenizer.token_to_id(strings["eos_token"])
        self.pad_id = hf_tokenizer.token_to_id(strings["pad_token"]) if strings["pad_token"] else self.eos_id
        self.stop_ids = frozenset([self.eos_id, *from_model["eos_token_id"]])  # every end of a reply
        self.special_ids = frozenset(i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special)
        source = template if template is not None else self.config.get("chat_template")
        if isinstance(source, list):  # [{"name": ..., "template": ...}]: transformers uses "default"
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        origin = f"the chat template of {path.parent if path else 'the tokenizer'}"
        self.template = (ChatTemplate(source, self.special_tokens, origin) if isinstance(source, str) else
                         ChatTemplate.plain(self.special_tokens, str(path.parent if path else "the tokenizer")))

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None, *,
              min_frequency: int = 2) -> Tokenizer:
        """Train on texts (for files: data.documents.iter_documents of each).

        The vocabulary holds at most vocab_size tokens (6 added + 256 bytes + merges); it is smaller when
        the text offers fewer merges of at least min_frequency occurrences. Saved as out_dir/tokenizer.json.
        """
        from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
        from tokenizers import Tokenizer as HFTokenizer

        floor = len(SPECIAL_TOKENS) + 256
        if vocab_size < floor:
            raise ValueError(f"vocab_size={vocab_size} must be >= {floor} (6 added tokens + 256 bytes)")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_texts_for_training(texts), trainer)
        spec = json.loads(tok.to_str())  # the trainer makes every added token special; the think tags are not
        for added in spec["added_tokens"]:
            added["special"] = added["content"] not in (THINK, END_THINK)
        out = cls(HFTokenizer.from_str(json.dumps(spec)), config=None)
        if out_dir is not None:
            out.save(out_dir)
        return out

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a folder's tokenizer (tokenizer.json with tokenizer_config.json, chat_template.jinja,
        config.json and generation_config.json beside it when present), or a tokenizer.json path."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"no tokenizer at {file} (make one with `nanoseek tokenizer`, or give a model folder "
                             f"that has a tokenizer.json)")
        try:
            hf = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json: {e}") from None
        folder = file.parent
        config = _read_json(folder / CONFIG_NAME) if (folder / CONFIG_NAME).is_file() else None
        model = _read_json(folder / "config.json")
        ids = (model.get("model", model), _read_json(folder / "generation_config.json"))
        jinja = folder / "chat_template.jinja"
        return cls(hf, file, config, ids, jinja.read_text() if jinja.is_file() else None)

    def save(self, out_dir: str | Path) -> Path:
        """tokenizer.json and tokenizer_config.json (with the special tokens and the chat template)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / FILE_NAME
        self._tok.save(str(self.path))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                  **self.config, **self.special_tokens, "chat_template": self.template.source}
        (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=1, ensure_ascii=False))
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
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (parallel in Rust; no offsets computed)."""
        return [e.ids for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Exact inverse of encode for whole sequences; special tokens are kept as their strings."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

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

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """The conversation as text, by the chat template (kwargs reach the template, as in transformers)."""
        return self.template.render(messages, add_generation_prompt, **kwargs)

    def apply_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        """Token ids of render_chat: transformers' `apply_chat_template(..., tokenize=True)` (the template
        writes bos itself; no special tokens are added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt, **kwargs))

    @functools.cached_property
    def chat_markers(self) -> tuple[int | None, int | None]:
        """(user, assistant): the special tokens that open a user and an assistant turn in the template, when
        each is one token (DeepSeek's <｜User｜> / <｜Assistant｜>, nanoseek's <|user|> / <|assistant|>);
        SFT's loss on assistant turns is found by them."""
        u, a = "\u2063user\u2063", "\u2063assistant\u2063"
        text = self.render_chat([{"role": "user", "content": u}, {"role": "assistant", "content": a}], False)
        heads = text[:text.find(u)], text[text.find(u) + len(u):text.find(a)]
        added = set(self._tok.get_added_tokens_decoder())
        ids = [self.encode(h)[-1:] if u in text and a in text else [] for h in heads]
        return tuple(i[0] if i and i[0] in added and i[0] not in (self.bos_id, self.eos_id) else None for i in ids)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, path={str(self.path) if self.path else None!r})"
