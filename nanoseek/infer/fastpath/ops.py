"""The decoding plan's small ops, each equal to the reference's (tests/infer/fastpath/test_ops.py).

- `rms_norm`: RMSNorm of up to 4 rows as LayerNorm of [x, -x] (mean 0, variance mean(x^2)): one fused kernel
  where F.rms_norm is a composite of ~10 small ops on CPU;
- `rope_matrices` + `rotate`: RoPE is linear, so each position's rotation is a d_r x d_r matrix (row j is the
  rotated unit vector e_j); built once per step, one batched product per call instead of complex views;
- `experts_few`: the routed experts of a few rows, one W x^T product per expert that has rows (`gemv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.infer.fastpath.gemv import matmul_wt
from nanoseek.model import norm
from nanoseek.model.rope import apply_rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of a few rows x (n <= 4, H) as LayerNorm of [x, -x] times the weight (~0.2 ms per `nano` step);
    from 16 rows on the composite is faster again, so more rows (and other dtypes) take norm.rms_norm."""
    if x.shape[0] > 4 or x.dtype != torch.float32 or weight.dtype != torch.float32:
        return norm.rms_norm(x, weight, eps)
    H = x.shape[-1]
    return F.layer_norm(torch.cat([x, x.neg()], -1), (2 * H,), None, None, eps)[:, :H].mul(weight)


def rope_matrices(cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """cos, sin (n, d_r/2) -> R (n, d_r, d_r) with x @ R[i] = RoPE of x at row i's position."""
    n, d = cos.shape[0], 2 * cos.shape[1]
    eye = torch.eye(d, device=cos.device).expand(1, n, d, d)  # (b=1, s=n, "heads"=d, d)
    return apply_rope(eye, cos[None], sin[None], interleave)[0]


def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """RoPE of x (n, h, d_r) by its rows' rotation matrices rot (n, d_r, d_r): one batched product, in fp32
    (returned in x's dtype)."""
    if x.dtype != rot.dtype:
        return torch.bmm(x.to(rot.dtype), rot).to(x.dtype)
    return torch.bmm(x, rot)


def experts_few(gate_up: list[torch.Tensor], down: list[torch.Tensor], x: torch.Tensor, idx: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    """What Experts.forward computes, y (t, H) = sum_k weights * FFN_idx(x), for few rows x (t, H): tokens grouped
    by expert, then one (W_j x_j^T)^T per expert that has rows (x W^T grouped_mm is 1.3-2x slower here).
    gate_up[j] (2I, H), down[j] (H, I): expert j's weights, unbound once."""
    t, k = idx.shape
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=len(gate_up)).tolist()
    token = order // k
    xs = x.index_select(0, token)  # (t k, H), grouped by expert

    def per_expert(rows: torch.Tensor, ws: list[torch.Tensor]) -> torch.Tensor:
        outs, start = [], 0
        for j, n in enumerate(counts):
            if n:
                outs.append(matmul_wt(rows[start:start + n], ws[j]))
                start += n
        return torch.cat(outs)

    gate, up = per_expert(xs, gate_up).chunk(2, dim=-1)
    act = F.silu(gate) * up * weights.flatten()[order, None].to(xs.dtype)
    return torch.zeros_like(x).index_add_(0, token, per_expert(act, down))
