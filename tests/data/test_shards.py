import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanoseek.data.documents import iter_documents
from nanoseek.data.shards import ShardSet, is_val, prepare, token_dtype
from tests.data.conftest import MIXED_TEXT, StubTokenizer, range_docs, write_jsonl


def split_docs(tokenizer, shards: ShardSet, split: str) -> list[str]:
    """Decode a split's stream and cut it at eos; every document is framed by bos ... eos."""
    stream = np.concatenate(shards.arrays(split)) if shards.arrays(split) else np.zeros(0, np.uint16)
    assert len(stream) == 0 or stream[-1] == tokenizer.eos_id
    cuts = np.flatnonzero(stream == tokenizer.eos_id)
    starts = [0, *(cuts[:-1] + 1)]
    assert all(stream[a] == tokenizer.bos_id for a in starts[: len(cuts)])
    return [tokenizer.decode(stream[a + 1:b]) for a, b in zip(starts, cuts)]


@pytest.fixture
def inputs(tmp_path):
    docs = [f"document {i}: {MIXED_TEXT[i % 4]}" for i in range(120)]
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(d.replace("\n", " ") for d in docs[:40]) + "\n", encoding="utf-8")
    jsonl = write_jsonl(tmp_path / "b.jsonl", [{"text": d, "id": i} for i, d in enumerate(docs[40:80])])
    pq.write_table(pa.table({"text": docs[80:]}), tmp_path / "c.parquet")
    return [txt, jsonl, tmp_path / "c.parquet"], [d.replace("\n", " ") for d in docs[:40]] + docs[40:]


def test_prepare_txt_jsonl_parquet(tokenizer, inputs, tmp_path):
    files, docs = inputs
    summary = prepare(files, tokenizer, tmp_path / "out", val_fraction=0.2, progress=False)
    s = ShardSet.open(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["dtype"] == "uint16" and s.dtype == np.uint16 and index["vocab_size"] == tokenizer.vocab_size
    assert index["eos_id"] == tokenizer.eos_id and index["tokenizer_sha256"] == tokenizer.sha256
    assert s.tokenizer().sha256 == tokenizer.sha256  # found through the relative path in the index
    train, val = split_docs(tokenizer, s, "train"), split_docs(tokenizer, s, "val")
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert train == [d for d in docs if not is_val(d, 0.2)]  # input order is kept
    assert 5 <= len(val) <= 45
    for split, got in (("train", train), ("val", val)):
        assert summary[split]["docs"] == index["splits"][split]["docs"] == len(got)
        shards = index["splits"][split]["shards"]
        assert summary[split]["tokens"] == s.num_tokens(split) == sum(sh["tokens"] for sh in shards)
    assert s.check_vocab(tokenizer.vocab_size) < tokenizer.vocab_size


def test_val_split_is_stable_and_by_text():
    texts = [f"doc {i}" for i in range(4000)]
    frac = np.mean([is_val(t, 0.1) for t in texts])
    assert 0.08 < frac < 0.12
    assert [is_val(t, 0.1) for t in texts[:50]] == [is_val(t, 0.1) for t in texts[:50]]
    assert [is_val(t, 0.1, seed=1) for t in texts[:200]] != [is_val(t, 0.1) for t in texts[:200]]
    assert not any(is_val(t, 0.0) for t in texts)


def test_output_independent_of_workers_and_rollover(tokenizer, inputs, tmp_path):
    files, _ = inputs
    prepare(files, tokenizer, tmp_path / "w1", workers=1, val_fraction=0.2, shard_tokens=500, progress=False)
    prepare(files, tokenizer, tmp_path / "w3", workers=3, val_fraction=0.2, shard_tokens=500, progress=False)
    a, b = ShardSet.open(tmp_path / "w1"), ShardSet.open(tmp_path / "w3")
    shards = a.index["splits"]["train"]["shards"]
    assert len(shards) > 2 and shards == b.index["splits"]["train"]["shards"]
    for sa, sb in zip(a.arrays("train"), b.arrays("train")):
        assert np.array_equal(sa, sb)
        assert sa[-1] == tokenizer.eos_id  # shards end at document boundaries
    stream = np.concatenate(a.arrays("train"))
    for sh in shards:
        assert sh["offset"] == sum(x["tokens"] for x in shards if x["offset"] < sh["offset"])
    lo = shards[1]["offset"] - 7  # a read across a shard boundary
    assert np.array_equal(a.read("train", lo, lo + 20), stream[lo:lo + 20])


def test_uint32_when_vocab_exceeds_uint16(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    docs = range_docs(30, 10, start=65520)  # ids above 65535
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    prepare([f], StubTokenizer(vocab_size=70000), tmp_path / "out", val_fraction=0, progress=False)
    s = ShardSet.open(tmp_path / "out")
    assert s.dtype == np.uint32 and s.index["dtype"] == "uint32"
    stream = np.concatenate(s.arrays("train"))
    assert stream.max() == 69999 and stream[:12].tolist() == [69998, *range(65520, 65530), 69999]
    assert s.check_vocab(70000) == 69999


def test_check_vocab_names_max_id(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "5 9000 7"}, {"text": "3 4"}])
    prepare([f], StubTokenizer(vocab_size=20000), tmp_path / "out", val_fraction=0, progress=False)
    s = ShardSet.open(tmp_path / "out")
    with pytest.raises(ValueError, match=r"token id 19999 is out of range for vocab_size=8192"):
        s.check_vocab(8192)
    with pytest.raises(ValueError, match=r"token id 19999 .* vocab_size=19999"):
        s.check_vocab(19999)


@pytest.mark.parametrize("name, content, match", [
    ("empty.txt", "", r"empty.txt: no documents"),
    ("blank.txt", "\n\n  \n", r"blank.txt: no documents"),
    ("empty.jsonl", "", r"empty.jsonl: no documents"),
    ("field.jsonl", '{"text": "ok"}\n{"body": "x", "id": 3}\n',
     r"field.jsonl:2: no field 'text' \(fields: \['body', 'id'\]\)"),
    ("json.jsonl", '{"text": "ok"}\nnot json\n', r"json.jsonl:2: not valid JSON"),
    ("type.jsonl", '{"text": 5}\n', r"type.jsonl:1: field 'text' is int"),
    ("data.csv", "a,b\n", r"unsupported extension '.csv'"),
    ("noext", "x", r"unsupported extension '\(none\)'"),
])
def test_bad_inputs(tokenizer, tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        prepare([path], tokenizer, tmp_path / "out", progress=False)


def test_bad_inputs_other(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"missing.jsonl: no such file"):
        prepare([tmp_path / "missing.jsonl"], tokenizer, tmp_path / "out", progress=False)
    pq.write_table(pa.table({"content": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match=r"p.parquet: no column 'text' \(columns: \['content'\]\)"):
        prepare([tmp_path / "p.parquet"], tokenizer, tmp_path / "out", progress=False)
    assert list(iter_documents(tmp_path / "p.parquet", "content")) == ["a", "b"]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        list(iter_documents(tmp_path / "bad.parquet"))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8"):
        list(iter_documents(tmp_path / "latin1.txt"))
    f = write_jsonl(tmp_path / "few.jsonl", [{"text": "one document"}])
    with pytest.raises(ValueError, match="no document fell in the validation split"):
        prepare([f], tokenizer, tmp_path / "out", val_fraction=0.01, progress=False)


def test_shard_dir_errors(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="not a shard directory"):
        ShardSet.open(tmp_path)
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in MIXED_TEXT])
    prepare([f], tokenizer, tmp_path / "out", val_fraction=0, progress=False)
    s = ShardSet.open(tmp_path / "out")
    with pytest.raises(ValueError, match=r"split='test'"):
        s.arrays("test")
    path = tmp_path / "out" / "train_00000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match="the index says"):
        ShardSet.open(tmp_path / "out").arrays("train")
