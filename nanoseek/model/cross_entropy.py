"""Cross-entropy of the output head without materializing the (tokens, vocab) logits.

    loss = mean_n [logsumexp(h_n W^T) - (h_n W^T)_{y_n}]      over targets y_n != ignore_index
    dL/dlogits = (softmax - onehot(y)) / N,   dh = dlogits W,   dW = dlogits^T h

The rows are processed in chunks that fit in cache; the gradients are computed in the same pass (as in
Liger's fused linear cross-entropy) and handed to autograd, so training never holds the full logits in
memory. The FLOPs are those of the plain head + cross-entropy (forward and backward). Without autograd
the gradient work is skipped.
"""

from __future__ import annotations

import torch


def _chunk_rows(vocab: int) -> int:
    return max(16, (1 << 24) // vocab)  # about 64 MiB of fp32 logits per chunk


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, target, ignore_index):
        n = h.shape[0]
        valid = target != ignore_index
        count = valid.sum().clamp_min(1)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dh = torch.empty_like(h) if need_grad else None
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = _chunk_rows(w.shape[0])
        for i in range(0, n, step):
            hc, tc, vc = h[i:i + step], target[i:i + step], valid[i:i + step]
            logits = (hc @ w.T).float()  # (c, V)
            lse = logits.logsumexp(dim=-1)
            safe = tc.where(vc, 0)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - picked) * vc).sum()
            if need_grad:
                p = logits.sub_(lse[:, None]).exp_()  # softmax, in place
                p[torch.arange(len(tc), device=p.device), safe] -= 1
                p *= vc[:, None] / count
                p = p.to(h.dtype)
                dh[i:i + step] = p @ w
                dw.addmm_(p.T.to(dw.dtype), hc.to(dw.dtype))
        if need_grad:
            ctx.save_for_backward(dh, dw.to(w.dtype))
        return total / count

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad, dw * grad, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """h (..., H), weight (V, H), target (...) -> mean cross-entropy of h @ weight^T against target."""
    return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, target.reshape(-1), ignore_index)
