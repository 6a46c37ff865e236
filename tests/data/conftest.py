import json
from pathlib import Path

import pytest

from nanoseek.data.chat_template import NANOSEEK_CHAT
from nanoseek.data.tasks import TASKS
from nanoseek.data.tokenizer import Tokenizer

MIXED_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 2024!",
    "深度求索的模型会先思考，再回答。中文文本也应当完整往返。",
    "Emoji: 😀 👨‍👩‍👧 🇫🇷, accents: café, naïve, e\u0301.",
    "def f(x):\n    return x ** 2  # tabs\tand\r\nnewlines",
]


class StubTokenizer:
    """Encodes "5 6 7" as [5, 6, 7]: streams of known ids (any vocabulary size) for shard and loader tests."""

    def __init__(self, vocab_size: int = 65001, eos_id: int | None = None):
        self.vocab_size, self.eos_id = vocab_size, vocab_size - 1 if eos_id is None else eos_id
        self.bos_id = self.eos_id - 1
        self.path, self.sha256 = None, "stub"
        self.template = NANOSEEK_CHAT  # documents with "messages" render in nanoseek's format

    def encode_batch(self, texts):
        return [[int(t) for t in s.split()] for s in texts]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def range_docs(n_docs: int, doc_len: int, start: int = 0) -> list[str]:
    """Documents of consecutive ids, so every token except eos is unique in the stream."""
    return [" ".join(map(str, range(start + i * doc_len, start + (i + 1) * doc_len))) for i in range(n_docs)]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    """A small BPE trained on task documents and mixed text (a few hundred tokens)."""
    docs = [p.document for t in TASKS.values() for p in t.sample(60, seed=1)]
    return Tokenizer.train(iter(docs + MIXED_TEXT * 5), 600, tmp_path_factory.mktemp("tok"))
