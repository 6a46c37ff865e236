import json
import re

import numpy as np
import pytest

from nanoseek.cli import main
from nanoseek.data.builtin import BUILTIN_MIX, ensure_builtin_data, generate_corpus, heldout
from nanoseek.data.loader import TokenLoader
from nanoseek.data.shards import ShardSet
from nanoseek.data.tasks import split_of
from tests.data.conftest import MIXED_TEXT, write_jsonl

N_DOCS = 1500  # a reduced corpus; the default (60,000) builds the same way in a few seconds


@pytest.fixture(scope="module")
def builtin_dir(tmp_path_factory):
    return ensure_builtin_data(tmp_path_factory.mktemp("builtin"), vocab_size=512, n_train_docs=N_DOCS,
                               val_fraction=0.05, progress=False)


def prompts_in(text: str) -> list[str]:
    return re.findall(r"<\|user\|>(.*?)<\|assistant\|>", text, flags=re.S)


def test_corpus_never_contains_heldout_prompts(builtin_dir):
    corpus = [json.loads(line)["text"] for line in open(builtin_dir / "corpus.jsonl")]
    assert len(corpus) == N_DOCS
    shards = ShardSet.open(builtin_dir)
    tok = shards.tokenizer()
    decoded = {split: tok.decode(np.concatenate(shards.arrays(split))) for split in ("train", "val")}
    assert decoded["train"].count("<|end_of_text|>") + decoded["val"].count("<|end_of_text|>") == N_DOCS
    prompts = [q for text in decoded.values() for q in prompts_in(text)]
    assert len(prompts) == N_DOCS and sorted(prompts) == sorted(q for d in corpus for q in prompts_in(d))
    assert all(split_of(q) == "train" for q in prompts)  # train and val shards alike
    assert not {p.prompt for p in heldout(300)} & set(prompts)


def test_builtin_is_cached_and_usable(builtin_dir):
    stamp = (builtin_dir / "index.json").stat().st_mtime_ns
    again = ensure_builtin_data(builtin_dir.parent, vocab_size=512, n_train_docs=N_DOCS, val_fraction=0.05,
                                progress=False)
    assert again == builtin_dir and (builtin_dir / "index.json").stat().st_mtime_ns == stamp
    shards = ShardSet.open(builtin_dir)
    tok = shards.tokenizer()
    assert shards.vocab_size == tok.vocab_size <= 512 and shards.check_vocab(tok.vocab_size) < tok.vocab_size
    x, y = TokenLoader(builtin_dir, "train", batch_size=2, seq_len=64).next_batch()
    assert x.shape == (2, 64) and int(x.max()) < tok.vocab_size
    next(TokenLoader(builtin_dir, "val", batch_size=2, seq_len=64).val_batches(1))
    config = json.loads((builtin_dir / "builtin.json").read_text())
    assert config["n_train_docs"] == N_DOCS and config["summary"]["train"]["docs"] > 0.9 * N_DOCS
    # short documents: the RL stage samples many completions on a CPU
    tokens = (shards.num_tokens("train") + shards.num_tokens("val")) / N_DOCS
    assert 30 < tokens < 60


def test_corpus_is_seeded_and_mixed():
    a, b = generate_corpus(400, seed=0), generate_corpus(400, seed=0)
    assert a == b and a != generate_corpus(400, seed=1)
    share = {}
    for p in generate_corpus(2000):
        share[p.task] = share.get(p.task, 0) + 1 / 2000
    assert share["add"] + share["sub"] > 0.5 and share["add"] == max(share.values())
    assert set(share) == {name for name, *_ in BUILTIN_MIX}
    held = heldout(200, seed=0)
    assert held == heldout(200, seed=0) and len({p.prompt for p in held}) == 200
    assert all(p.split == "heldout" for p in held)


def test_cli_tokenizer_and_prepare(tmp_path, capsys):
    f = write_jsonl(tmp_path / "d.jsonl", [{"body": f"{i}: {t}"} for i in range(50) for t in MIXED_TEXT])
    assert main(["tokenizer", "--input", str(f), "--vocab-size", "400", "--out", str(tmp_path / "tok"),
                 "--text-field", "body"]) == 0
    assert main(["prepare", "--input", str(f), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "sh"),
                 "--text-field", "body", "--val-fraction", "0.1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"]["docs"] + summary["val"]["docs"] == 200 and summary["dtype"] == "uint16"
    assert main(["prepare", "--input", str(f), "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "x")]) == 2
    assert "no field 'text'" in capsys.readouterr().err
    assert main(["prepare", "--out", str(tmp_path / "x")]) == 2
    assert "--builtin" in capsys.readouterr().err
    assert main(["prepare", "--builtin", "--out", str(tmp_path / "b"), "--docs", "300", "--vocab-size", "400"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["train"]["docs"] + summary["val"]["docs"] == 300
