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
        wf = w.float()  # everything in fp32, whatever the autocast around (logits need the range)
        dh = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        dw = torch.empty(w.shape, dtype=torch.float32, device=w.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        step = min(n, _chunk_rows(w.shape[0]))
        # one logits buffer, reused by every chunk: fresh large allocations page-fault on every touch. The logits
        # are kept transposed, (V, c): W h^T, dW += dlogits^T h and dh = dlogits W then run as MKL's fastest
        # forms here (no transposed weight operand; 168-184 vs 135-167 GFLOP/s at V = 32768, H = 512)
        buf = torch.empty(w.shape[0] * step, dtype=torch.float32, device=h.device)
        for i in range(0, n, step):
            hc, tc, vc = h[i:i + step], target[i:i + step], valid[i:i + step]
            hc, c = hc.float(), len(hc)
            logits = torch.mm(wf, hc.T, out=buf[: w.shape[0] * c].view(-1, c))  # (V, c)
            safe = tc.where(vc, 0)
            picked = logits.gather(0, safe[None, :]).squeeze(0)
            top = logits.amax(dim=0, keepdim=True)
            p = logits.sub_(top).exp_()  # in place: exp(logits - max)
            z = p.sum(dim=0, keepdim=True)
            lse = (top + z.log()).squeeze(0)
            total += ((lse - picked) * vc).sum()
            if need_grad:
                p.div_(z)  # softmax
                p[safe, torch.arange(c, device=p.device)] -= 1
                p.mul_((vc / count)[None, :])
                torch.mm(p.T, wf, out=dh[i:i + step])
                dw.addmm_(p, hc, beta=1 if i else 0)  # beta=0: the first chunk overwrites
        if need_grad:
            ctx.save_for_backward(dh.to(h.dtype), dw.to(w.dtype))
        return total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        # scaled in place: a fresh 64 MiB head gradient would page-fault its way in (~85 ms per step at `small`)
        if getattr(ctx, "done", False):
            raise RuntimeError("linear_cross_entropy's backward runs once per forward (retain_graph is not supported)")
        ctx.done = True
        dh, dw = ctx.saved_tensors
        return dh.mul_(grad), dw.mul_(grad), None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100) -> torch.Tensor:
    """h (..., H), weight (V, H), target (...) -> mean cross-entropy of h @ weight^T against target."""
    with torch.autocast(h.device.type, enabled=False):
        return _LinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), weight, target.reshape(-1), ignore_index)
