"""kernels.apply: it swaps exactly the plain modules, keeps every parameter, and a whole training step through
every kernel equals the plain model's (losses and gradients, odd shapes, both GEMM libraries). Gradients are
ordinary tensors: one kept across steps never changes. Settings are checked, and "auto" takes a recorded choice."""

import copy

import pytest
import torch
from torch import nn

from nanoseek import ModelConfig, Transformer, kernels
from nanoseek.infer.fastpath import plan_for
from nanoseek.kernels import gemm
from nanoseek.kernels.attention import BlockedMLA
from nanoseek.kernels.experts import GroupedExperts
from nanoseek.kernels.head import FusedHead
from nanoseek.model.fp8_linear import FP8Experts, FP8Linear, to_fp8

LIBRARIES = ["blas"] + ["onednn"] * (gemm.onednn_product() is not None)


def model_pair(**overrides):
    torch.manual_seed(0)
    plain = Transformer(ModelConfig.preset("tiny", **overrides))
    return plain, copy.deepcopy(plain)


@pytest.mark.parametrize("library", LIBRARIES)
def test_apply_swaps_the_plain_modules_and_keeps_the_parameters(library):
    plain, fast = model_pair()
    params = dict(fast.named_parameters())
    settings = kernels.apply(fast, kernels.Settings(gemm=library))
    assert settings == kernels.Settings(gemm=library)
    assert dict(fast.named_parameters()) == params  # the same Parameter objects
    assert fast.state_dict().keys() == plain.state_dict().keys()
    types = {type(m) for m in fast.modules()}
    assert {BlockedMLA, FusedHead, GroupedExperts} <= types
    assert (gemm.Linear in types) == (library == "onednn") and (nn.Linear in types) == (library == "blas")
    assert plan_for(fast.eval()) is not None  # the decoding plan reads the kernels' modules as the plain ones


def test_fp8_layers_keep_their_class():
    _, fast = model_pair()
    to_fp8(fast)
    kernels.apply(fast, kernels.Settings(gemm=LIBRARIES[-1]))
    types = {type(m) for m in fast.modules()}
    assert FP8Linear in types and FP8Experts in types and GroupedExperts not in types
    assert not any(type(m) is gemm.Linear and "self_attn" in n for n, m in fast.named_modules())


def train_step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    loss = out.loss + 0.3 * sum(out.mtp_losses) + 1e-2 * sum(r.balance_loss for r in out.router)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_training_step_through_every_kernel_equals_the_plain_model(library):
    """3 rows of 130 tokens (blocked attention over three blocks, MTP, MoE), wide enough that the products pass
    oneDNN's threshold."""
    plain, fast = model_pair(hidden_size=256, moe_intermediate_size=128, intermediate_size=512)
    kernels.apply(fast, kernels.Settings(gemm=library))
    ids = torch.randint(0, plain.config.vocab_size, (3, 131))
    (want, gw), (got, gg) = train_step(plain, ids), train_step(fast, ids)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert gg.keys() == gw.keys()
    for name in gw:
        torch.testing.assert_close(gg[name], gw[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("library", LIBRARIES)
def test_a_gradient_kept_across_steps_never_changes(library):
    _, model = model_pair()
    kernels.apply(model, kernels.Settings(gemm=library))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, model.config.vocab_size, (2, 33))
    train_step(model, ids)
    kept = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    copies = {n: g.clone() for n, g in kept.items()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    train_step(model, ids.roll(5, dims=1))
    for n, g in kept.items():
        assert torch.equal(g, copies[n]), n


def test_settings_are_checked_and_auto_takes_the_recorded_choice():
    with pytest.raises(ValueError, match="kernels.attention='flash' must be one of blocked, sdpa"):
        kernels.Settings(attention="flash")
    with pytest.raises(ValueError, match="kernels.keep_freed_memory='yes' must be true or false"):
        kernels.Settings(keep_freed_memory="yes")
    recorded = {"gemm": LIBRARIES[-1], "attention": "sdpa"}
    assert kernels.resolve(kernels.Settings(), recorded) == kernels.Settings(gemm=LIBRARIES[-1])
    assert kernels.resolve(kernels.Settings(gemm="blas"), recorded).gemm == "blas"  # an explicit choice stands
    assert kernels.resolve(kernels.Settings()).gemm in gemm.LIBRARIES
