import json

import numpy as np
import pytest
import torch

from nanoseek.data.loader import TokenLoader
from nanoseek.data.shards import ShardSet, prepare
from tests.data.conftest import StubTokenizer, range_docs, write_jsonl

EOS = 65000
L = 16


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    """~2,000 tokens in several shards: documents of 9 consecutive ids, each followed by eos."""
    root = tmp_path_factory.mktemp("stream")
    docs = range_docs(200, 9)
    f = write_jsonl(root / "d.jsonl", [{"text": d} for d in docs])
    prepare([f], StubTokenizer(vocab_size=EOS + 1), root / "shards", val_fraction=0.1, shard_tokens=300, progress=False)
    return root / "shards"


def stream(d, split="train"):
    return np.concatenate(ShardSet.open(d).arrays(split)).astype(np.int64)


def start_of(row: torch.Tensor, s: np.ndarray) -> int:
    """Where a window sits in the stream (ids are unique except bos/eos, so one other token pins it)."""
    j = next(j for j, t in enumerate(row.tolist()) if t not in (EOS, EOS - 1))
    hits = np.flatnonzero(s == int(row[j]))
    assert len(hits) == 1
    return int(hits[0]) - j


def test_shapes_shift_and_packing(stream_dir):
    s = stream(stream_dir)
    loader = TokenLoader(stream_dir, "train", batch_size=4, seq_len=L, seed=0)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (4, L) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y):
        i = start_of(row_x, s)
        assert np.array_equal(row_x.numpy(), s[i:i + L]) and np.array_equal(row_y.numpy(), s[i + 1:i + L + 1])
    # documents are packed back to back, each framed by bos ... eos, never padded
    assert (x == EOS).any() and (y == EOS).sum() > 0
    cuts = np.flatnonzero(s == EOS)
    assert np.all(np.diff(cuts) == 11) and np.all(s[cuts[:-1] + 1] == EOS - 1)


def test_epoch_covers_distinct_windows(stream_dir):
    s = stream(stream_dir)
    loader = TokenLoader(stream_dir, "train", batch_size=3, seq_len=L, seed=5)
    n = loader.batches_per_epoch
    assert loader.tokens_per_epoch == n * 3 * L and n == ((len(s) - L) // L) // 3
    starts = [start_of(r, s) for _ in range(n) for r in loader.next_batch()[0]]
    assert len(set(starts)) == len(starts) == 3 * n  # no window repeats within an epoch
    assert len({st % L for st in starts}) == 1  # one grid per epoch
    assert loader.epoch == 0
    loader.next_batch()
    assert loader.epoch == 1 and loader.cursor == 1


def test_determinism_from_seed(stream_dir):
    a = [TokenLoader(stream_dir, batch_size=4, seq_len=L, seed=1).next_batch()[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    c = TokenLoader(stream_dir, batch_size=4, seq_len=L, seed=2).next_batch()[0]
    assert not torch.equal(a[0], c)


def test_resume_is_exact(stream_dir):
    ref = TokenLoader(stream_dir, batch_size=4, seq_len=L, seed=3)
    n = ref.batches_per_epoch + 5  # crosses an epoch boundary after the resume point
    full = [ref.next_batch() for _ in range(2 * n)]
    first = TokenLoader(stream_dir, batch_size=4, seq_len=L, seed=3)
    half = [first.next_batch() for _ in range(n)]
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    second = TokenLoader(stream_dir, batch_size=4, seq_len=L, seed=3)
    second.load_state_dict(state)
    resumed = half + [second.next_batch() for _ in range(n)]
    for (x0, y0), (x1, y1) in zip(full, resumed):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def test_ranks_partition_windows(stream_dir):
    s = stream(stream_dir)
    loaders = [TokenLoader(stream_dir, batch_size=2, seq_len=L, seed=0, rank=r, world_size=3) for r in range(3)]
    n = loaders[0].batches_per_epoch
    assert n > 0 and all(lo.batches_per_epoch == n for lo in loaders)
    seen = [{start_of(r, s) for _ in range(n) for r in lo.next_batch()[0]} for lo in loaders]
    assert all(len(x) == 2 * n for x in seen)
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    assert loaders[0].tokens_per_epoch == n * 2 * L * 3


def test_val_batches_fixed(stream_dir):
    s = stream(stream_dir, "val")
    loader = TokenLoader(stream_dir, "val", batch_size=4, seq_len=L)
    a, b = list(loader.val_batches()), list(loader.val_batches())
    assert len(a) == -(-((len(s) - 1) // L) // 4)
    assert all(torch.equal(x0, x1) for (x0, _), (x1, _) in zip(a, b))
    assert np.array_equal(torch.cat([x for x, _ in a]).flatten().numpy(), s[:((len(s) - 1) // L) * L])  # in order
    assert len(list(loader.val_batches(max_batches=1))) == 1
    assert loader.state_dict()["cursor"] == 0


def test_loader_errors(stream_dir):
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenLoader(stream_dir, "val", batch_size=64, seq_len=L).next_batch()
    with pytest.raises(ValueError, match="fewer than one window"):
        next(TokenLoader(stream_dir, "val", batch_size=1, seq_len=10_000).val_batches())
    state = TokenLoader(stream_dir, batch_size=4, seq_len=L).state_dict()
    with pytest.raises(ValueError, match="seq_len=16 but this loader has 8"):
        TokenLoader(stream_dir, batch_size=4, seq_len=8).load_state_dict(state)
    with pytest.raises(ValueError, match="rank=2 must be in"):
        TokenLoader(stream_dir, rank=2, world_size=2)
