"""Clear errors: a layout that does not fit, and a rank that dies (the others stop, they do not hang)."""

import os
import time
from pathlib import Path

import pytest

from nanoseek.parallel import DistError
from nanoseek.parallel.parallelize import init_parallel
from nanoseek.train.config import load_train_config
from tests.parallel.conftest import spawn

pytestmark = pytest.mark.dist


def test_expert_count_not_divisible_by_ep():
    with pytest.raises(ValueError, match=r"ep=3 must divide model.n_routed_experts=8 .*allowed: \[1, 2, 4, 8\]"):
        load_train_config(None, ["preset=tiny", "ep=3"])
    with pytest.raises(ValueError, match="ep=0 must be a positive integer"):
        load_train_config(None, ["preset=tiny", "ep=0"])


def test_ep_without_a_launch(make_cfg_dist):
    from nanoseek.train.loop import train

    with pytest.raises(ValueError, match="ep=2 needs several processes: torchrun"):
        train(make_cfg_dist("ep=2"), None)


@pytest.fixture
def make_cfg_dist(tmp_path):
    return lambda *o: load_train_config(None, ["preset=tiny", f"out_dir={tmp_path / 'run'}", *o])


def test_world_size_not_divisible(monkeypatch):
    """Checked from torchrun's environment before any communication."""
    monkeypatch.setenv("WORLD_SIZE", "6")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"ep=4 must divide the world size 6 .* choose ep among \[1, 2, 3, 6\]"):
        init_parallel(ep=4, timeout=10, device="cpu")
    with pytest.raises(ValueError, match="batch_size=4 .* must be divisible by the world size 6"):
        init_parallel(ep=2, timeout=10, device="cpu", batch_size=4)


def failing_rank(rank, world, shard_dir, out, timeout, how):
    """Rank 1 fails in its third forward (step 3): it exits, or it stalls until rank 0 has stopped, so rank 0
    can only have stopped on dist_timeout. Both ranks write the wall-clock time of the event."""
    from nanoseek.train.loop import resolve_data, train

    def init(model):
        calls = []

        def fail(module, args):
            calls.append(1)
            if rank == 1 and len(calls) == 3:
                (Path(out) / "failed_at").write_text(repr(time.time()))
                while how == "stalls" and not (Path(out) / "stopped_at").exists():
                    time.sleep(0.05)
                os._exit(7)
        model.register_forward_pre_hook(fail)

    cfg = load_train_config(None, ["preset=tiny", f"data.path={shard_dir}", f"out_dir={out}", "steps=8",
                                   "batch_size=4", "data.seq_len=32", "eval_every=100", "ckpt_every=100",
                                   f"dist_timeout={timeout}"])
    cfg, shards, _ = resolve_data(cfg)
    try:
        train(cfg, shards, quiet=True, init=init)
    except DistError as e:
        (Path(out) / "stopped_at").write_text(repr(time.time()))
        print(f"stopped: {e}", flush=True)
        os._exit(5)


@pytest.mark.parametrize("how,timeout", [("dies", 30), ("stalls", 4)])
def test_a_failed_rank_stops_the_others(tmp_path, shard_dir, how, timeout):
    """A dead rank closes its connections: the others stop before dist_timeout could have expired. A stalled
    one (alive until rank 0 stops) is given up on after dist_timeout seconds."""
    out = tmp_path / "run"
    codes, outs = spawn(failing_rank, 2, str(shard_dir), str(out), timeout, how, tmp_path=tmp_path,
                        timeout=timeout + 60)
    assert codes == [5, 7], outs
    assert "rank 0 of 2" in outs[0] and "another rank died" in outs[0] and f"dist_timeout={timeout}" in outs[0]
    waited = float((out / "stopped_at").read_text()) - float((out / "failed_at").read_text())
    if how == "dies":
        assert waited < timeout, outs[0]
