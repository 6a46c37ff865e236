"""The distributed training path on NCCL (skipped without a CUDA device): one spawned rank, FSDP2 over a
1-GPU mesh, trains as the plain single-process loop on the same GPU (fp32: the same sums)."""

import json

import pytest
import torch

from nanoseek.train.loop import resolve_data, train
from tests.parallel.conftest import check, spawn
from tests.parallel.test_train import config

pytestmark = [pytest.mark.dist, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def nccl_rank(rank, world, shard_dir, out):
    cfg, shards, _ = resolve_data(config(shard_dir, out, "device=cuda", "dtype=fp32"))
    result = train(cfg, shards, quiet=True)  # launched: init_parallel joins NCCL, parallelize applies FSDP2
    assert result.world == 1 and result.model is not None


def losses(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def test_one_nccl_rank_trains_like_one_process(tmp_path, shard_dir):
    cfg, shards, _ = resolve_data(config(shard_dir, tmp_path / "single", "device=cuda", "dtype=fp32"))
    train(cfg, shards, quiet=True)
    check(*spawn(nccl_rank, 1, str(shard_dir), tmp_path / "nccl", tmp_path=tmp_path))
    ref, got = losses(tmp_path / "single"), losses(tmp_path / "nccl")
    assert len(got) == len(ref) == 4
    for a, b in zip(got, ref):
        for key in ("main", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    state = json.loads((tmp_path / "nccl" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["layout"]["world_size"] == 1
