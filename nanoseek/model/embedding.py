"""The token embedding, nn.Embedding with its weight gradient in reused memory when training on CPU.

    forward: E[ids];   backward: dE = zeros(V, H), dE[ids[n]] += dY[n]

The dense (V, H) gradient is fresh memory every step with nn.Embedding (0.15 GiB at V = 49k, H = 768), and
filling it page-faults (model/workspace.py); here it is zeroed in place in a `Workspace` instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.workspace import Workspace


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight, workspace):
        ctx.save_for_backward(ids)
        ctx.param, ctx.workspace = weight, workspace
        return F.embedding(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        (ids,) = ctx.saved_tensors
        dw = ctx.workspace.grad(ctx.param).zero_()
        dw.index_add_(0, ids.flatten(), dy.reshape(-1, dy.shape[-1]).to(dw.dtype))
        return None, dw, None


class Embedding(nn.Embedding):
    """Same parameter and state-dict name (`weight`) as nn.Embedding."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self._workspace = Workspace()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.device.type == "cpu" and w.requires_grad and torch.is_grad_enabled():
            return _Lookup.apply(ids, w, self._workspace)
        return super().forward(ids)
