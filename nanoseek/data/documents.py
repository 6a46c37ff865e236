"""Document readers: the documents of one input, whatever its format.

    .txt      documents separated by blank lines (a paragraph is a document; for one document per file
              use .jsonl)
    .jsonl    one JSON object per line; the document is its `text_field` (default "text"), or, for rows
              with a "messages" list instead (SFT data), that conversation in the chat format
    .parquet  the `text_field` column
    hf:NAME[:SPLIT]  a Hugging Face dataset (needs `datasets` and a reachable hub; streamed)

Errors name the file and line (or row) and say what was expected.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path

from nanoseek.data.chat_template import NANOSEEK_CHAT, ChatTemplate

EXTENSIONS = (".txt", ".jsonl", ".parquet")


def check_input(path: str | Path) -> None:
    """Fail fast on a missing file or an unsupported extension."""
    s = str(path)
    if s.startswith("hf:"):
        return
    p = Path(path)
    if p.suffix not in EXTENSIONS:
        raise ValueError(f"{p}: unsupported extension {p.suffix or '(none)'!r}; allowed: "
                         f"{', '.join(EXTENSIONS)}, or hf:NAME[:SPLIT] for a Hugging Face dataset")
    if not p.is_file():
        raise ValueError(f"{p}: no such file")


def iter_documents(path: str | Path, text_field: str = "text", chat: ChatTemplate = NANOSEEK_CHAT) -> Iterator[str]:
    """Yield the non-empty documents of one input (see the module docstring for the formats); conversations
    are rendered by `chat` (the tokenizer's template)."""
    check_input(path)
    s = str(path)
    if s.startswith("hf:"):
        reader = _read_hf(s[3:], text_field)
    else:
        reader = {".txt": _read_txt, ".jsonl": functools.partial(_read_jsonl, chat=chat),
                  ".parquet": _read_parquet}[Path(path).suffix](Path(path), text_field)
    n = 0
    for doc in reader:
        n += 1
        yield doc
    if n == 0:
        raise ValueError(f"{path}: no documents (the file is empty or all its texts are empty)")


def _read_txt(path: Path, _field: str) -> Iterator[str]:
    lines: list[str] = []
    try:
        with open(path, encoding="utf-8", newline="") as f:  # newline="": keep \r\n as written
            for line in f:
                if line.strip():
                    lines.append(line)
                elif lines:
                    yield "".join(lines).rstrip("\r\n")
                    lines = []
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None
    if lines:
        yield "".join(lines).rstrip("\r\n")


def iter_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a .jsonl file; errors name the file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield lineno, row
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 ({e})") from None


def _chat_document(path: Path, lineno: int, messages, chat: ChatTemplate) -> str:
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError(f"{path}:{lineno}: 'messages' must be a non-empty list of {{role, content}} objects")
    try:
        return chat.document(messages)
    except ValueError as e:
        raise ValueError(f"{path}:{lineno}: {e}") from None


def _read_jsonl(path: Path, field: str, chat: ChatTemplate) -> Iterator[str]:
    for lineno, row in iter_jsonl(path):
        if field not in row and "messages" in row:
            yield _chat_document(path, lineno, row["messages"], chat)
            continue
        if field not in row:
            raise ValueError(f"{path}:{lineno}: no field {field!r} (fields: {sorted(row)}); "
                             f"name the text field with --text-field")
        text = row[field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{path}:{lineno}: field {field!r} holds a lone surrogate "
                             f"(not encodable as UTF-8)") from None
        if text:
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt or empty files
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); name it with --text-field")
    for batch in pf.iter_batches(columns=[field], batch_size=8192):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{path}: column {field!r} holds {type(text).__name__}, not strings")
            if text:
                yield text


def _read_hf(spec: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"hf:{spec}: reading Hugging Face datasets needs `pip install datasets`") from None
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train", streaming=True)
    for i, row in enumerate(ds):
        if field not in row:
            raise ValueError(f"hf:{spec} row {i}: no field {field!r} (fields: {sorted(row)})")
        if row[field]:
            yield row[field]
