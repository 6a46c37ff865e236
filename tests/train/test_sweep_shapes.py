"""bench/train_throughput.py --sweep compares like with like: every sweep shape, scaled down, builds in both
frameworks on the same weights, and the benchmark's own step (forward + backward + AdamW) gives the same loss
in both, before and after an optimizer step. No timing here: that stays in the benchmark."""

import importlib.util
import os
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import pytest
import torch

from nanoseek import kernels

pytest.importorskip("transformers")
_spec = importlib.util.spec_from_file_location("train_throughput",
                                               Path(__file__).parents[2] / "bench" / "train_throughput.py")
bench = importlib.util.module_from_spec(_spec)
with mock.patch.dict(os.environ):  # the benchmark sets a torch allocator variable for itself
    _spec.loader.exec_module(bench)


def test_the_sweep_spans_the_issue_shapes():
    shapes = [bench.sweep_shape(name) for name in bench.SWEEP]
    assert len(shapes) >= 8
    assert min(c.vocab_size for c, _, _ in shapes) <= 4096 and max(c.vocab_size for c, _, _ in shapes) >= 65536
    assert {256, 1024} <= {c.hidden_size for c, _, _ in shapes} and {256, 1024} <= {s for _, _, s in shapes}
    moe = [c for c, _, _ in shapes if c.first_k_dense_replace < c.num_hidden_layers]
    assert {8, 64} <= {c.n_routed_experts for c in moe} and {2, 8} <= {c.num_experts_per_tok for c in moe}
    assert {c.q_lora_rank is None for c in moe} == {True, False} and len(moe) == len(shapes) - 1


@pytest.mark.parametrize("name", list(bench.SWEEP))
def test_every_sweep_shape_steps_alike_in_both_frameworks(name):
    cfg, batch, seq = bench.sweep_shape(name, quick=True)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    settings = kernels.Settings(gemm="blas", keep_freed_memory=False)
    ours, hf = (bench.step_fn(bench.build(kind, cfg, torch.device("cpu"), settings), kind == "hf", x[:, :-1],
                              x[:, 1:], nullcontext()) for kind in ("ours", "hf"))
    first = float(ours()), float(hf())  # the same weights: the same loss
    assert first[0] == pytest.approx(first[1], rel=1e-5, abs=1e-6)
    second = float(ours()), float(hf())  # after one AdamW step each (nanoseek's adds the balance loss, alpha 1e-4)
    assert second[0] == pytest.approx(second[1], rel=1e-4) and second[0] < first[0]
