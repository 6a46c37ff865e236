"""Expert parallelism (DeepSeek-V3 report §3.2, "64-way EP"; torchtitan's AllToAllTokenDispatcher in plain PyTorch).

The E routed experts of a MoE layer are split over an expert-parallel group of P ranks: rank j holds
experts [j E/P, (j+1) E/P). Each rank routes its own tokens (the gate, shared experts and attention stay
data parallel), then

    dispatch   sort its (token, expert) pairs by expert; exchange per-expert counts (all-to-all);
               send each rank the rows for its experts (all-to-all, uneven splits)      (rank-major rows)
    compute    the local experts on what arrived (`Experts.forward`: grouped GEMMs)
    combine    send the outputs back (the reverse all-to-all), weight by g and sum per token

    y_t = sum_{i in TopK_t} g_{t,i} FFN_i(x_t)       (the same sum as the local layer, in another order)

Both all-to-alls are autograd functions (functional collectives' all_to_all_single_autograd, as in
torchtitan), so the backward sends the gradients back along the same routes. Left out: DeepEP's kernels, FP8 dispatch,
redundant experts (EPLB) and overlapping the exchange with compute (DeepSeek-V3 report §3.2.1-3.2.2, §3.3.3, §3.4).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd

from nanoseek.model.moe import Experts


class ExpertParallel(Experts):
    """The experts of one MoE layer that live on this rank, with dispatch and combine around them.

    Holds `gate_up_proj` (E/P, 2I, H) and `down_proj` (E/P, H, I): the same parameter names as `Experts`,
    so state-dict keys do not change; `global_shape` and `expert_offset` say where they sit in the layer's
    (E, ...) tensors (checkpoints use them)."""

    def __init__(self, experts: Experts, group: dist.ProcessGroup):
        nn.Module.__init__(self)
        self.group = group
        self.ep_size, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.n_experts = experts.gate_up_proj.shape[0]
        if self.n_experts % self.ep_size:
            raise ValueError(f"ep={self.ep_size} must divide the number of routed experts {self.n_experts}")
        self.n_local = self.n_experts // self.ep_size
        self.expert_offset = self.ep_rank * self.n_local
        block = slice(self.expert_offset, self.expert_offset + self.n_local)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[block].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[block].clone())

    def global_shape(self, local: torch.Tensor) -> torch.Size:
        """Shape of the whole layer's tensor of which `local` (a parameter or its optimizer state) is a block."""
        return torch.Size((self.n_experts, *local.shape[1:]))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (t, H), idx/weights (t, k) -> y (t, H) = sum_k weights * FFN_idx(x), this rank's tokens per expert (e,)."""
        t, k = idx.shape
        P, e = self.ep_size, self.n_local
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # (t k) pairs sorted by expert, hence by the rank that holds it
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // k
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)  # rank-major: (P, e) rows for my experts
        recv_counts = recv_counts.view(P, e)
        # the split sizes go to the host: the one synchronisation of the exchange (as in torchtitan)
        send_splits = counts.view(P, e).sum(dim=1).tolist()
        recv_splits = recv_counts.sum(dim=1).tolist()
        xs = x[token]  # (t k, H)
        received = all_to_all_single_autograd(xs, recv_splits, send_splits, self.group)
        local_idx = torch.arange(e, device=x.device).repeat(P).repeat_interleave(recv_counts.flatten())
        ys, _ = super().forward(received, local_idx[:, None], torch.ones_like(local_idx, dtype=weights.dtype)[:, None])
        out = all_to_all_single_autograd(ys, send_splits, recv_splits, self.group)
        out = out * weights.flatten()[order, None].to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token, out), counts


def apply_expert_parallel(model: nn.Module, group: dist.ProcessGroup) -> list[ExpertParallel]:
    """Replace the routed experts of every MoE layer (main and MTP) by this rank's block of them."""
    layers = []
    for moe in model.moe_layers():
        moe.experts = ExpertParallel(moe.experts, group)
        layers.append(moe.experts)
    return layers
