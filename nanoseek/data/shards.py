"""`prepare`: text files -> memory-mapped token shards with an index and a held-out validation split.

Inputs: the documents of .txt, .jsonl, .parquet files or hf:NAME datasets (data/documents.py).

Output directory:
    index.json            format, dtype, vocab_size, eos_id, tokenizer (path relative to the directory)
                          and its sha256, and per split the shard list with tokens / docs / offsets
    train_00000.bin ...   raw little-endian token ids (np.memmap-able), uint16 if vocab_size <= 65536
    val_00000.bin ...     else uint32; each document is written bos + tokens + eos, so bos/eos mark the boundaries

The validation split is chosen per document: val iff blake2b(seed, utf-8 text) / 2**64 < val_fraction.
It depends on the text only (not on order, files or Python's salted `hash`), so identical documents
always land on the same side. Shards end at document boundaries and hold about `shard_tokens` tokens.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np

from nanoseek.data.documents import check_input, iter_documents
from nanoseek.data.tokenizer import Tokenizer

FORMAT = "nanoseek-shards-v1"
SPLITS = ("train", "val")
INDEX = "index.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 2**16), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_val(text: str, val_fraction: float, seed: int = 0) -> bool:
    """The stable per-document split rule (see the module docstring)."""
    if val_fraction <= 0:
        return False
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=seed.to_bytes(16, "little"))
    return int.from_bytes(h.digest(), "little") / 2**64 < val_fraction


# ---------------------------------------------------------------------- writing shards
class _SplitWriter:
    """Appends documents (already framed by bos ... eos) to `{split}_{k:05d}.bin`, rolling over at doc boundaries."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self.tokens = self.docs = 0
        self._file = None
        self._buf: list[int] = []

    def add(self, ids: list[int]) -> None:
        if self._file is None:
            name = f"{self.split}_{len(self.shards):05d}.bin"
            self._file = open(self.out_dir / name, "wb")
            self.shards.append({"file": name, "tokens": 0, "docs": 0, "offset": self.tokens, "first_doc": self.docs})
        shard = self.shards[-1]
        self._buf.extend(ids)
        shard["tokens"] += len(ids)
        shard["docs"] += 1
        self.tokens += len(ids)
        self.docs += 1
        if len(self._buf) >= 1 << 20:
            self._flush()
        if shard["tokens"] >= self.shard_tokens:
            self.close()

    def _flush(self) -> None:
        np.asarray(self._buf, dtype=self.dtype).tofile(self._file)
        self._buf = []

    def close(self) -> None:
        if self._file is not None:
            self._flush()
            self._file.close()
            self._file = None


def prepare(inputs: list[str | Path], tokenizer: Tokenizer, out_dir: str | Path, *, text_field: str = "text",
            val_fraction: float = 0.01, shard_tokens: int = 1 << 24, workers: int = 2, seed: int = 0,
            progress: bool = True) -> dict:
    """Tokenize `inputs` into shards under out_dir (see the module docstring); returns a summary dict.

    Documents are read in the main thread and encoded in chunks by `workers` threads (the Rust encoder
    releases the GIL); the output order is the input order, so the result does not depend on `workers`.
    """
    from tqdm import tqdm

    if not inputs:
        raise ValueError("prepare: no inputs given")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    if shard_tokens < 1 or workers < 1:
        raise ValueError(f"shard_tokens={shard_tokens} and workers={workers} must be >= 1")
    for path in inputs:
        check_input(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*out_dir.glob("train_*.bin"), *out_dir.glob("val_*.bin"), out_dir / INDEX]:
        old.unlink(missing_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)
    writers = {s: _SplitWriter(out_dir, s, dtype, shard_tokens) for s in SPLITS}
    bos, eos = [tokenizer.bos_id] if tokenizer.bos_id is not None else [], [tokenizer.eos_id]

    def chunks(size: int = 1024) -> Iterator[list[str]]:
        chunk: list[str] = []
        for path in inputs:
            for doc in iter_documents(path, text_field, tokenizer.template):
                chunk.append(doc)
                if len(chunk) == size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def write(texts: list[str], encoded: list[list[int]]) -> None:
        for text, ids in zip(texts, encoded):
            writers["val" if is_val(text, val_fraction, seed) else "train"].add(bos + ids + eos)
        bar.update(sum(len(ids) + 1 for ids in encoded))
        bar.set_postfix(docs=writers["train"].docs + writers["val"].docs, refresh=False)

    t0 = time.perf_counter()
    bar = tqdm(unit="tok", unit_scale=True, desc="prepare", disable=not progress)
    try:
        with ThreadPoolExecutor(workers) as pool:
            pending: deque = deque()
            for chunk in chunks():
                pending.append((chunk, pool.submit(tokenizer.encode_batch, chunk)))
                if len(pending) > 2 * workers:
                    texts, fut = pending.popleft()
                    write(texts, fut.result())
            while pending:
                texts, fut = pending.popleft()
                write(texts, fut.result())
    finally:
        bar.close()
        for w in writers.values():
            w.close()
    if writers["train"].docs == 0:
        raise ValueError(f"prepare: every document fell in the validation split (val_fraction={val_fraction})")
    if val_fraction > 0 and writers["val"].docs == 0:
        raise ValueError(f"prepare: no document fell in the validation split (val_fraction={val_fraction} of "
                         f"{writers['train'].docs} documents); raise val_fraction, or pass 0 for no split")
    seconds = time.perf_counter() - t0
    tok_path = None
    if tokenizer.path is not None:
        tok_path = os.path.relpath(Path(tokenizer.path).resolve(), out_dir.resolve())
    index = {"format": FORMAT, "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
             "tokenizer": tok_path, "tokenizer_sha256": tokenizer.sha256, "inputs": [str(p) for p in inputs],
             "text_field": text_field, "val_fraction": val_fraction, "seed": seed,
             "splits": {s: {"tokens": w.tokens, "docs": w.docs, "shards": w.shards} for s, w in writers.items()}}
    tmp = out_dir / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX)  # written last: a directory with index.json is complete
    total = writers["train"].tokens + writers["val"].tokens
    return {"out_dir": str(out_dir), "dtype": dtype.name, "vocab_size": tokenizer.vocab_size,
            **{s: {k: index["splits"][s][k] for k in ("docs", "tokens")} | {"shards": len(w.shards)}
               for s, w in writers.items()},
            "seconds": round(seconds, 3), "tokens_per_s": round(total / max(seconds, 1e-9))}


# ---------------------------------------------------------------------- reading shards
class ShardSet:
    """A prepared shard directory: its index, the shards of each split as memmaps, a vocabulary check."""

    def __init__(self, root: Path, index: dict):
        self.root, self.index = root, index
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size: int = index["vocab_size"]
        self.eos_id: int = index["eos_id"]
        self._arrays: dict[str, list[np.memmap]] = {}

    @classmethod
    def open(cls, shard_dir: str | Path) -> ShardSet:
        root = Path(shard_dir)
        file = root / INDEX
        if not file.is_file():
            raise ValueError(f"{root}: not a shard directory (no {INDEX}); make one with `nanoseek prepare`")
        try:
            index = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: corrupt ({e})") from None
        if index.get("format") != FORMAT:
            raise ValueError(f"{file}: format {index.get('format')!r}, expected {FORMAT!r}")
        return cls(root, index)

    def num_tokens(self, split: str) -> int:
        return self._split(split)["tokens"]

    def num_docs(self, split: str) -> int:
        return self._split(split)["docs"]

    def _split(self, split: str) -> dict:
        if split not in self.index["splits"]:
            raise ValueError(f"split={split!r}: {self.root} has splits {sorted(self.index['splits'])}")
        return self.index["splits"][split]

    def arrays(self, split: str) -> list[np.memmap]:
        """The shards of a split, in stream order, as read-only memmaps (sizes checked against the index)."""
        if split not in self._arrays:
            out = []
            for shard in self._split(split)["shards"]:
                path = self.root / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                size = path.stat().st_size if path.is_file() else None
                if size != expected:
                    raise ValueError(f"{path}: {'missing' if size is None else f'{size} bytes'}, "
                                     f"the index says {expected} bytes; re-run `nanoseek prepare`")
                out.append(np.memmap(path, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
            self._arrays[split] = out
        return self._arrays[split]

    def read(self, split: str, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of a split's concatenated stream (may span shards)."""
        offsets = [s["offset"] for s in self._split(split)["shards"]]
        arrays = self.arrays(split)
        if not 0 <= start <= stop <= self.num_tokens(split):
            raise ValueError(f"read({start}, {stop}) is outside split {split!r} of {self.num_tokens(split)} tokens")
        if start == stop:
            return np.zeros(0, self.dtype)
        k = int(np.searchsorted(offsets, start, side="right")) - 1
        pieces = []
        while start < stop:
            a = arrays[k]
            lo = start - offsets[k]
            hi = min(stop - offsets[k], len(a))
            pieces.append(a[lo:hi])
            start += hi - lo
            k += 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def check_vocab(self, vocab_size: int) -> int:
        """Raise if any token id is >= vocab_size (e.g. shards made with another tokenizer); return the max id."""
        max_id, where = -1, None
        for split in self.index["splits"]:
            for shard, a in zip(self._split(split)["shards"], self.arrays(split)):
                for lo in range(0, len(a), 1 << 24):
                    m = int(a[lo:lo + (1 << 24)].max())
                    if m > max_id:
                        max_id, where = m, shard["file"]
        if max_id >= vocab_size:
            raise ValueError(f"{self.root / where}: token id {max_id} is out of range for vocab_size={vocab_size} "
                             f"(the shards were prepared for a {self.vocab_size}-token vocabulary); use a model "
                             f"with vocab_size >= {max_id + 1}, or re-run `nanoseek prepare` with its tokenizer")
        return max_id

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with (recorded in index.json)."""
        from nanoseek.data.tokenizer import Tokenizer

        if not self.index.get("tokenizer"):
            raise ValueError(f"{self.root / INDEX}: records no tokenizer path")
        tok = Tokenizer.load(self.root / self.index["tokenizer"])
        if tok.sha256 != self.index["tokenizer_sha256"]:
            raise ValueError(f"{tok.path} has changed since {self.root} was prepared (sha256 differs)")
        return tok
