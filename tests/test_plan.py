"""nanoseek plan: memory per GPU, checked by hand on the tiny preset."""

import json

import pytest

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.plan import memory_plan


def test_tiny_by_hand():
    """tiny: H 64, r_q 32, r_kv 32, 4 heads (d_qk 24, d_v 16, d_r 8), I 128, I_m 32, E 8, K 2, N_s 1,
    vocab 512, layers 3 (1 dense) + 1 MTP. Attention 5152 (q) + 6688 (kv) + 4096 (o) = 15936; a block adds
    two norms (128): dense 16064 + 24576 = 40640; MoE 16064 + router 512 + shared 6144 + 8 x 6144."""
    plan = memory_plan(ModelConfig.preset("tiny"), dp=4, ep=2, micro_batch=2, seq_len=16)
    main_model = 2 * 512 * 64 + 64 + 40640 + 2 * (16064 + 512 + 6144 + 8 * 6144)
    mtp = 16064 + 512 + 6144 + 8 * 6144 + 3 * 64 + 2 * 64 * 64
    N = main_model + mtp
    assert plan.params == N == 330240
    assert plan.expert_params == 3 * 8 * 6144
    assert plan.block_max == 16064 + 512 + 6144 + 4 * 6144  # E / ep = 4 routed experts gathered
    assert plan.root == 2 * 512 * 64 + 64
    assert plan.weights == plan.gradients == 4 * N / 4 and plan.optimizer == 8 * N / 4
    assert plan.gathered == 2 * (plan.root + 2 * plan.block_max)
    assert plan.block_gradients == 4 * plan.block_max
    # per token: attention 2H + 2r_q + 2r_kv + d_r + n_h(2 d_qk + 2 d_v) = 128 + 64 + 64 + 8 + 320 = 584;
    # dense FFN 2H + 3I = 512; MoE 2H + K(H + 3 I_m) + 3 N_s I_m = 544 (+ 8 fp32 scores); ends 2H + 2H (MTP)
    per_token = 2 * (584 + 512) + 3 * (2 * (584 + 544) + 4 * 8) + 2 * (128 + 128)
    assert plan.activations == 2 * 16 * per_token
    assert plan.total == pytest.approx(plan.weights + plan.gathered + plan.gradients + plan.block_gradients
                                       + plan.optimizer + plan.activations)
    assert memory_plan(ModelConfig.preset("tiny"), dp=4, ep=1).block_max == plan.block_max + 4 * 6144


def test_errors():
    cfg = ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="--ep 3 must divide --dp 4"):
        memory_plan(cfg, dp=4, ep=3)
    with pytest.raises(ValueError, match="--ep 16 must divide the 8 routed experts"):
        memory_plan(cfg, dp=16, ep=16)
    with pytest.raises(ValueError, match="--dp 0 must be a positive integer"):
        memory_plan(cfg, dp=0)


def test_cli_v3(capsys):
    assert main(["plan", "--preset", "v3-671b", "--dp", "2048", "--ep", "64", "--gpu", "h800", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["memory"]["values"]
    assert out["weights"]["value"] == pytest.approx(4 * 682.64e9 / 2048, rel=1e-4)
    assert "headroom" in out
    assert main(["plan", "--preset", "v3-671b", "--dp", "8", "--ep", "3"]) == 2
