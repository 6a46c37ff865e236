"""Expert parallelism: a 2-rank EP MoE layer equals the local layer (outputs, input and weight gradients)."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from nanoseek.config import ModelConfig
from nanoseek.model.moe import MoE
from tests.parallel.conftest import check, spawn

pytestmark = pytest.mark.dist

CFG = dict(hidden_size=64, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
           topk_group=2)


def layer(skewed: bool) -> MoE:
    """skewed: the router bias sends every token to experts 0-3 (rank 0), so rank 1 receives no rows."""
    torch.manual_seed(0)
    moe = MoE(ModelConfig.preset("tiny", **CFG))
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
    if skewed:
        moe.gate.e_score_correction_bias[:4] += 10
    return moe


def inputs(rank: int, tokens: int):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, tokens, CFG["hidden_size"], generator=g)
    # upstream gradient: a real, contiguous one (_grouped_mm's backward rejects out.sum()'s stride-0 grad)
    return x, torch.randn(x.shape, generator=g)


def ep_rank(rank, world, out_dir):
    dist.init_process_group("gloo")
    for skewed in (False, True):
        ep_forward_backward(rank, out_dir, skewed)
    dist.destroy_process_group()


def ep_forward_backward(rank, out_dir, skewed):
    from nanoseek.parallel.ep import apply_expert_parallel

    moe = layer(skewed)
    holder = torch.nn.Module()
    holder.moe_layers = lambda: [moe]
    (experts,) = apply_expert_parallel(holder, dist.group.WORLD)
    # rank 1 sends 3 tokens, rank 0 sends 24: uneven splits, and some experts receive nothing
    x, g = inputs(rank, 24 if rank == 0 else 3)
    x.requires_grad_(True)
    y, stats = moe(x)
    (y * g).sum().backward()
    tensors = {"y": y.detach(), "dx": x.grad, "counts": stats.tokens_per_expert,
               "d_gate_up": experts.gate_up_proj.grad, "d_down": experts.down_proj.grad,
               "d_gate": moe.gate.weight.grad, "d_shared": moe.shared_experts.down_proj.weight.grad}
    save_file({k: v.contiguous() for k, v in tensors.items()}, f"{out_dir}/rank{rank}-{skewed}.safetensors")
    (out_dir / f"rank{rank}.json").write_text(json.dumps({"offset": experts.expert_offset,
                                                          "local": experts.n_local}))


def test_ep_layer_matches_local_layer(tmp_path):
    check(*spawn(ep_rank, 2, tmp_path, tmp_path=tmp_path))
    for skewed in (False, True):
        compare(tmp_path, skewed)


def compare(tmp_path, skewed):
    ref = layer(skewed)
    xs, gs = zip(*(inputs(r, n) for r, n in ((0, 24), (1, 3))))
    outs = []
    for x, g in zip(xs, gs):
        x.requires_grad_(True)
        y, stats = ref(x)
        (y * g).sum().backward()  # gradients accumulate over both ranks' tokens, as EP's do
        outs.append((y.detach(), x.grad, stats.tokens_per_expert))
    total = torch.zeros(8, dtype=torch.long)
    for r in range(2):
        got = load_file(tmp_path / f"rank{r}-{skewed}.safetensors")
        meta = json.loads((tmp_path / f"rank{r}.json").read_text())
        block = slice(meta["offset"], meta["offset"] + meta["local"])
        y, dx, counts = outs[r]
        torch.testing.assert_close(got["y"], y, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["dx"], dx, rtol=1e-5, atol=1e-6)
        assert torch.equal(got["counts"], counts)
        torch.testing.assert_close(got["d_gate_up"], ref.experts.gate_up_proj.grad[block], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["d_down"], ref.experts.down_proj.grad[block], rtol=1e-5, atol=1e-5)
        total += got["counts"]
    assert int(total.sum()) == (24 + 3) * 2  # T K over both ranks
    assert (total[4:] == 0).all() if skewed else (total > 0).all()
