"""DeepSeekMoE: shared experts + fine-grained routed experts (DeepSeek-V3 report §2.1.2).

Shapes: t tokens (b*s flattened), e routed experts, k experts per token, g groups.

    y = FFN_shared(x) + sum_{i in TopK} g_i FFN_i(x)

Gate (V3, topk_method="noaux_tc", scoring_func="sigmoid"), all in fp32:
    s      = sigmoid(x W_g^T)                    affinities (t, e)
    s_sel  = s + b                               b = e_score_correction_bias: selection only, no gradient
    group  = sum of the top-2 s_sel per group;   keep topk_group groups, other experts -> -inf
    idx    = topk(s_sel, k);  w = s[idx] (UNBIASED);  w = w / sum(w);  w *= routed_scaling_factor
V2 gates: softmax affinities, group score = max ("group_limited_greedy") or no groups ("greedy"), no bias.

Routed experts are stacked tensors (gate_up_proj (e, 2I, H), down_proj (e, H, I)); tokens are sorted by expert
and each projection is one grouped GEMM (`F.grouped_mm`), or one product per expert where grouped_mm has no
kernel (fp32 on CUDA) or no backward (CPU training). Not here: the bias update b += gamma sign(mean(c) - c) is
a training-loop step (train/loop.py); faster CPU training products are applied from outside
(nanoseek/kernels/experts.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU FFN: down(silu(gate(x)) * up(x)). Dense layers and the shared experts."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RouterStats(NamedTuple):
    """Per MoE layer, one forward: tokens routed to each expert (e,) and the sequence-wise balance loss
    L_Bal / alpha = mean over sequences of sum_i f_i P_i (DeepSeek-V3 report §2.1.2, the complementary sequence-wise balance loss), None where not computed."""

    tokens_per_expert: torch.Tensor
    balance_loss: torch.Tensor | None


class Gate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.method, self.scoring = cfg.topk_method, cfg.scoring_func
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        if cfg.uses_router_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        """Keep the router bias in fp32 whatever dtype the model is cast to (bf16 is too coarse near the bias values to order close affinities; transformers keeps it in fp32 too)."""
        bias = getattr(self, "e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            self.e_score_correction_bias = bias.to(device=self.e_score_correction_bias.device, dtype=torch.float32)
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (t, H) -> weights (t, k) fp32, expert ids (t, k), affinities s (t, e) fp32."""
        return self.route(F.linear(x.float(), self.weight.float()))

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits x W_g^T (t, e) fp32 -> weights, expert ids, affinities (as forward)."""
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias if self.method == "noaux_tc" else scores
        if self.method != "greedy" and self.topk_group < self.n_group:
            grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (t, g, e/g)
            if self.method == "noaux_tc":
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
            else:
                group_scores = grouped.amax(dim=-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices  # (t, topk_group)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
            choice = (grouped if choice is not scores else grouped.clone()).masked_fill_(
                dropped[:, :, None], float("-inf")).view(-1, self.n_experts)  # in place on a fresh tensor
        idx = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, idx)
        if self.norm_topk_prob:
            weights.div_(weights.sum(dim=-1, keepdim=True).add_(1e-20))
        return weights.mul_(self.scaling), idx, scores


def grouped_mm_ok(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" or (x.is_cuda and x.dtype == torch.bfloat16)


class Experts(nn.Module):
    """E routed SwiGLU experts as stacked weights; tokens grouped by expert, one grouped GEMM per projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, H))  # rows: I gate, then I up
        self.down_proj = nn.Parameter(torch.empty(E, H, I))

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (t, H), idx/weights (t, k) -> y (t, H) = sum_k weights * FFN_idx(x), tokens per expert (e,)."""
        t, k = idx.shape
        E = self.gate_up_proj.shape[0]
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # assignment slots sorted by expert
        counts = torch.bincount(flat, minlength=E)
        token = order // k  # the (t*k) rows x[token] are grouped by expert
        gate, up = self._product(x, self.gate_up_proj, counts, token).chunk(2, dim=-1)
        # w * down(a) = down(w * a): weight the I-wide activation, not the H-wide output
        act = F.silu(gate) * up * weights.flatten()[order, None].to(gate.dtype)
        out = self._product(act, self.down_proj, counts)
        return x.new_zeros(x.shape, dtype=out.dtype).index_add_(0, token, out), counts  # (autocast: out may be bf16)

    def _product(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                 token: torch.Tensor | None = None) -> torch.Tensor:
        """The rows x[token] (x itself when token is None), counts[j] of them for expert j, each times w[j]^T."""
        return self._mm(x if token is None else x.index_select(0, token), w, counts)

    @staticmethod
    def _mm(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Row block j of xs (counts[j] rows) times w[j]^T: one grouped GEMM, or one product per expert where
        grouped_mm has no kernel (fp32 on CUDA) or no backward (CPU, under autograd)."""
        grad = torch.is_grad_enabled() and (xs.requires_grad or w.requires_grad)
        if grouped_mm_ok(xs) and not (grad and xs.device.type == "cpu"):
            offs = counts.cumsum(0).to(torch.int32)
            return F.grouped_mm(xs, w.transpose(1, 2), offs=offs)
        return torch.cat([x_j @ w_j.T for x_j, w_j in zip(xs.split(counts.tolist()), w)])  # empty blocks too:
        # an expert without rows gets a zero gradient, not none


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.gate = Gate(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (MLP(cfg.hidden_size, cfg.n_shared_experts * cfg.moe_intermediate_size)
                               if cfg.n_shared_experts else None)

    def forward(self, x: torch.Tensor, balance_loss: bool = True) -> tuple[torch.Tensor, RouterStats]:
        b, s, H = x.shape
        flat = x.reshape(-1, H)
        weights, idx, scores = self.gate(flat)
        y, counts = self.experts(flat, idx, weights)
        y = y.view(b, s, H)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        loss = self.balance_loss(idx, scores, b) if balance_loss else None
        return y, RouterStats(counts, loss)

    def balance_loss(self, idx: torch.Tensor, scores: torch.Tensor, batch: int) -> torch.Tensor:
        """Sequence-wise balance loss without alpha (paper eq. 17-20), mean over the b sequences:
        f_i = E/(K T) sum_t 1[i in TopK_t] (no gradient);  P_i = 1/T sum_t s_i,t / sum_j s_j,t;  sum_i f_i P_i."""
        T = idx.shape[0] // batch
        hits = torch.zeros(batch, self.n_experts, device=idx.device, dtype=scores.dtype)
        hits.scatter_add_(1, idx.view(batch, T * self.top_k), torch.ones_like(idx, dtype=scores.dtype).view(batch, -1))
        f = hits * (self.n_experts / (self.top_k * T))
        p = (scores / scores.sum(dim=-1, keepdim=True)).view(batch, T, -1).mean(dim=1)
        return (f * p).sum(dim=-1).mean()
