"""The training loop under 2 gloo ranks: data parallel (FSDP2) and data + expert parallel (ep=2).

One launch trains both layouts for 4 steps; the tests compare them with one process on the same global
batch (losses, gradient norms), check the router biases on every rank, and load the ep=2 run's sharded
checkpoint into one process (logits, weights, a resumed run)."""

import json
import shutil

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from nanoseek.parallel import checkpoint as dist_checkpoint
from nanoseek.hf import export, load_pretrained
from nanoseek.model import Transformer
from nanoseek.train.config import load_train_config
from nanoseek.train.loop import resolve_data, train
from nanoseek.train.optim import build_optimizer
from tests.parallel.conftest import check, spawn

pytestmark = pytest.mark.dist

# dp: 2 micro-batches of 1 row per rank (gradients reduced once per step); resumed: the single-process run
LAYOUTS = {"dp": ["ep=1", "batch_size=2", "grad_accum=2"], "ep": ["ep=2"], "resumed": ["ep=2"]}
PROBE = torch.arange(2 * 16).reshape(2, 16) % 97 + 3  # token ids for a logits probe


def config(shard_dir, out, *overrides):
    """optim.eps=1e-5: AdamW's first steps are nearly sign(g), which turns the ~1e-9 rounding differences of
    gradients that are almost zero into +-lr updates; a larger eps keeps those entries still, so the runs
    stay within float tolerance of each other (with eps=1e-8 they drift to ~1e-4 by step 4)."""
    return load_train_config(None, ["preset=tiny", f"data.path={shard_dir}", f"out_dir={out}", "steps=4",
                                    "batch_size=4", "data.seq_len=32", "log_every=1", "eval_every=2",
                                    "eval_batches=2", "ckpt_every=2", "optim.warmup_steps=1",
                                    "optim.lr=1e-2", "optim.eps=1e-5", "bias_gamma=0.01", *overrides])


def train_rank(rank, world, shard_dir, root):
    dist.init_process_group("gloo")  # owned here, so the trained (sharded) model can still run after train()
    for name, overrides in LAYOUTS.items():
        cfg, shards, _ = resolve_data(config(shard_dir, root / name, *overrides))
        held = []
        train(cfg, shards, resume=name == "resumed", quiet=True, init=held.append)
        model = held[0]
        biases = {f"{i}": moe.gate.e_score_correction_bias for i, moe in enumerate(model.moe_layers())}
        save_file(biases, str(root / f"{name}-bias-rank{rank}.safetensors"))
        with torch.no_grad():
            logits = model.eval()(PROBE[rank:rank + 1]).logits  # each rank its own row: a collective forward
        save_file({"logits": logits.contiguous()}, str(root / f"{name}-logits-rank{rank}.safetensors"))
    dist.destroy_process_group()


def losses(run_dir):
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r["val_loss"] for r in lines if "val_loss" in r]


def truncate(src, dst, step):
    """A copy of run `src` as if it had been killed after its checkpoint at `step`."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "checkpoints").glob("step_*"):
        if int(ckpt.name[5:]) > step:
            shutil.rmtree(ckpt)
    (dst / "checkpoints" / "latest").write_text(f"step_{step:06d}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shard_dir):
    root = tmp_path_factory.mktemp("dist_train")
    cfg, shards, _ = resolve_data(config(shard_dir, root / "single"))
    train(cfg, shards, quiet=True)
    truncate(root / "single", root / "resumed", 2)
    check(*spawn(train_rank, 2, str(shard_dir), root, tmp_path=root))
    return root, shard_dir


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks_train_like_one_process(runs, layout):
    """dp: 2 ranks x 2 micro-batches x 1 row, ep: 2 ranks x 2 rows = 1 process x 4 rows (the same windows);
    resumed: 2 ranks (ep=2) continue the single-process run from its step-2 checkpoint (safetensors, read
    whole by each rank) to the same steps 3 and 4."""
    root, _ = runs
    ref, ref_val = losses(root / "single")
    got, got_val = losses(root / layout)
    assert len(got) == len(ref) == 4 and len(got_val) == len(ref_val) == 2
    for a, b in zip(got, ref):
        for key in ("main", "mtp", "balance", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-6), (layout, a["step"], key)
        assert a["max_vio"] == pytest.approx(b["max_vio"], abs=1e-3)
    if layout != "dp":  # validation batches are micro-batches: dp's hold 2 rows, the reference's 4
        assert got_val == pytest.approx(ref_val, rel=2e-5)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_router_biases_identical_on_every_rank(runs, layout):
    root, _ = runs
    a, b = (load_file(root / f"{layout}-bias-rank{r}.safetensors") for r in range(2))
    assert a.keys() == b.keys() and len(a) == 3  # 2 main MoE layers and the MTP block
    for k in a:
        assert torch.equal(a[k], b[k]), k
        assert a[k].abs().sum() > 0 and a[k].dtype == torch.float32  # the updates happened, in fp32


def test_sharded_checkpoint_loads_in_one_process(runs, tmp_path):
    root, shard_dir = runs
    run = root / "ep"
    ckpt = run / "checkpoints" / "step_000004"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["layout"] == {"world_size": 2, "ep": 2, "dp": 1} and (ckpt / "dcp").is_dir()
    assert not list((ckpt / "dcp").glob("*.metadata"))  # no pickled DCP metadata
    cfg, _, _ = resolve_data(config(shard_dir, run, "ep=2"))
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    dist_checkpoint.load(ckpt, model, optimizer, None)
    with torch.no_grad():
        logits = model.eval()(PROBE).logits
    dist_logits = torch.cat([load_file(root / f"ep-logits-rank{r}.safetensors")["logits"] for r in range(2)])
    torch.testing.assert_close(logits, dist_logits, rtol=1e-5, atol=1e-5)
    full = load_pretrained(run).model  # model.safetensors, gathered by rank 0: the same weights
    for (name, a), (_, b) in zip(model.state_dict().items(), full.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(len(s) == 3 for s in optimizer.state.values()) and len(optimizer.state) == len(
        list(model.parameters()))
    out = export(run, tmp_path / "hf")  # the interop tools read a distributed run like any other
    assert (out / "config.json").is_file()


def test_resume_at_another_world_size(runs, tmp_path):
    """The ep=2 run's step-2 checkpoint resumed by one process reproduces steps 3-4 (data position, AdamW)."""
    root, shard_dir = runs
    run = tmp_path / "resumed"
    truncate(root / "ep", run, 2)
    cfg, shards, _ = resolve_data(config(shard_dir, run))
    train(cfg, shards, resume=True, quiet=True)
    got, _ = losses(run)
    ref, _ = losses(root / "ep")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for a, b in zip(got[2:], ref[2:]):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-4), a["step"]
