"""The routed experts' CPU training products: `GroupedExperts` is model.moe.Experts whose per-expert products
Y_j = X_j W_j^T run through `GroupedLinear` (forward and backward by kernels/gemm.py's grouped products).

The reference's CPU training path multiplies expert by expert under autograd (grouped_mm has no CPU backward)
and saves the gathered rows X = x[token]; `GroupedLinear` saves x and gathers again in its backward (k t H
numbers less held per MoE layer from the forward to the backward), and runs each projection as one grouped
GEMM on BLAS or per expert through oneDNN:

    dW_j = dY_j^T X_j (zeros for an expert without rows),   dX = sum over x's rows of dY_j W_j (index_add)
"""

from __future__ import annotations

import torch

from nanoseek.kernels.gemm import grouped, grouped_wgrad
from nanoseek.model.moe import Experts


class GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts, onednn, token=None):
        ctx.save_for_backward(x, w, token)
        ctx.rows, ctx.onednn = counts.tolist(), onednn
        return grouped(x if token is None else x.index_select(0, token), w, ctx.rows, onednn=onednn)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (x, w, token), rows, onednn = ctx.saved_tensors, ctx.rows, ctx.onednn
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[1]:
            xs = x if token is None else x.index_select(0, token)
            dw = grouped_wgrad(dy, xs, rows, torch.empty_like(w), onednn=onednn)
            del xs  # freed before dX is made
        if ctx.needs_input_grad[0]:
            dx = grouped(dy, w, rows, transposed=False, onednn=onednn)
            if token is not None:
                dx = x.new_zeros(x.shape).index_add_(0, token, dx)
        return dx, dw, None, None, None


class GroupedExperts(Experts):
    """Experts whose CPU training products run through `GroupedLinear`; `onednn` is set by kernels.apply."""

    kernel_of = Experts
    onednn: bool = False

    def _product(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                 token: torch.Tensor | None = None) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == w.dtype and w.requires_grad and torch.is_grad_enabled():
            return GroupedLinear.apply(x, w, counts, self.onednn, token)
        return super()._product(x, w, counts, token)
