"""The head's cross-entropy without materializing the (tokens, vocab) logits: `FusedHead` is model.head.Head
whose `losses` run `linear_cross_entropies`, the same function as the reference's chunked loss.

    loss = mean_n [logsumexp(h_n W^T) - (h_n W^T)_{y_n}]      over targets y_n != ignore_index
    dL/dlogits = (softmax - onehot(y)) / N,   dh = dlogits W,   dW = dlogits^T h

The rows are processed in chunks of `MIN_ROWS` rows, or of 2^23 logits where the vocabulary is small
enough for those to hold more rows; the logits are scaled by log2(e) in their GEMM and the
softmax taken in base 2 (exp2 runs ~3.5x faster than exp on CPU: kernels/attention.py); the gradients are
computed in the same pass (as in Liger's fused linear cross-entropy) and handed to autograd, so training never
holds the full logits in memory. The FLOPs are those of the plain head + cross-entropy (forward and backward). Without autograd
the gradient work is skipped.

Several losses on one weight (the main head and MTP's depths share it) are one autograd node: its backward
sums their weight gradients, dW = sum_k g_k dW_k, into one tensor (two nodes would have autograd add them
into a third).
"""

from __future__ import annotations

import torch

from nanoseek.kernels.attention import LOG2E
from nanoseek.kernels.gemm import addmm
from nanoseek.model.head import Head

LN2 = 0.6931471805599453  # 1 / LOG2E


MIN_ROWS = 512  # a chunk's rows are the logits product's N and dW's K: with 128-170 of them (2^23 logits at
# V = 48k-64k) whole steps ran 1.06-1.14x slower on a Zen 4 (docs/LOG.md). The buffer is then at most
# V x 512 fp32, never more than the (rows, V) logits of a plain head; 1024 rows gained no more, and with oneDNN at
# v16k-h1024 brought the peak to within 25 MiB of transformers'


def _chunk_rows(vocab: int) -> int:
    return max(MIN_ROWS, (1 << 23) // vocab)


def _one(h, wf, target, ignore_index, dh, dw, buf, onednn: bool) -> torch.Tensor:
    """Mean cross-entropy of h against target; dh (n, H) and dw (V, H) filled when given (dw overwritten)."""
    n, V = h.shape[0], wf.shape[0]
    valid = target != ignore_index
    count = valid.sum().clamp_min(1)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    step, rows_w = min(n, _chunk_rows(V)), max(256, (1 << 21) // wf.shape[1])  # rows_w x H: 8 MiB
    # buf: one logits buffer, reused by every chunk, or None where the products run through oneDNN, which
    # returns new tensors (kernels/gemm.py). The logits are
    # kept transposed, (V, c): W h^T, dW += dlogits^T h and dh = dlogits W then run as MKL's fastest forms
    # (no transposed weight operand; 168-184 vs 135-167 GFLOP/s at V = 32768, H = 512). dh and dW go by blocks
    # of `rows_w` vocabulary rows: oneDNN's V x H product per chunk raised the peak memory by 40 MiB at
    # v16k-h1024, and the blocks also run faster (the head at v8k 92 vs 108 ms, docs/LOG.md)
    for i in range(0, n, step):
        hc, tc, vc = h[i:i + step], target[i:i + step], valid[i:i + step]
        hc, c = hc.float(), len(hc)
        logits = addmm(None if buf is None else buf[: V * c].view(-1, c), wf, hc.T, alpha=LOG2E,
                       onednn=onednn)  # log2(e) W h^T
        safe = tc.where(vc, 0)
        picked = logits.gather(0, safe[None, :]).squeeze(0)
        top = logits.amax(dim=0, keepdim=True)
        p = logits.sub_(top).exp2_()  # in place: e^(W h^T - max)
        z = p.sum(dim=0, keepdim=True)
        lse = (top + z.log2()).squeeze(0)  # base 2: logsumexp / ln 2
        total += ((lse - picked) * vc).sum() * LN2
        if dh is not None:
            p.div_(z)  # softmax
            p[safe, torch.arange(c, device=p.device)] -= 1
            p.mul_((vc / count)[None, :])
            for v in range(0, V, rows_w):  # beta=0: the first block (dh) or chunk (dw) overwrites
                addmm(dh[i:i + step], p[v:v + rows_w].T, wf[v:v + rows_w], beta=1 if v else 0, onednn=onednn)
                addmm(dw[v:v + rows_w], p[v:v + rows_w], hc, beta=1 if i else 0, onednn=onednn)
    if dh is not None and n == 0:
        dw.zero_()
    return total / count


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, ignore_index, onednn, *pairs):
        """pairs: h_0, target_0, h_1, target_1, ... -> the K losses."""
        hs, targets = pairs[0::2], pairs[1::2]
        need_grad = any(ctx.needs_input_grad[3::2]) or ctx.needs_input_grad[0]
        wf = w.float()  # everything in fp32, whatever the autocast around (logits need the range)
        f32, rows = torch.float32, max(min(h.shape[0], _chunk_rows(w.shape[0])) for h in hs)
        onednn = onednn and w.device.type == "cpu"
        buf = None if onednn else torch.empty(w.shape[0] * rows, dtype=f32, device=w.device)
        losses, grads = [], []
        for h, target in zip(hs, targets):
            dh = dw = None
            if need_grad:
                dh = torch.empty(h.shape, dtype=f32, device=h.device)
                dw = torch.empty(w.shape, dtype=f32, device=w.device)
            losses.append(_one(h, wf, target, ignore_index, dh, dw, buf, onednn))
            grads.append((dh, dw))
        if need_grad:  # plain attributes, not saved tensors: autograd can then adopt dW as the weight's .grad
            ctx.grads = grads
            ctx.dtypes = (hs[0].dtype, w.dtype)
        return tuple(losses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *g):
        # scaled in place: no second (V, H) tensor
        if not hasattr(ctx, "grads"):
            raise RuntimeError("linear_cross_entropies' backward runs once per forward (retain_graph is not supported)")
        grads, (h_dtype, w_dtype) = ctx.grads, ctx.dtypes
        del ctx.grads
        dw = grads[0][1].mul_(g[0])
        for (_, dw_k), g_k in zip(grads[1:], g[1:]):
            dw.addcmul_(dw_k, g_k)
        dhs = [dh.mul_(g_k).to(h_dtype) for (dh, _), g_k in zip(grads, g)]
        return (dw.to(w_dtype), None, None, *[x for dh in dhs for x in (dh, None)])


def linear_cross_entropies(pairs: list[tuple[torch.Tensor, torch.Tensor]], weight: torch.Tensor,
                           ignore_index: int = -100, onednn: bool = False) -> tuple[torch.Tensor, ...]:
    """One mean cross-entropy per (h (..., H), target (...)) pair against the same head weight (V, H), as one
    autograd node (the weight's gradients summed in its backward); products through oneDNN where `onednn`."""
    flat = [x for h, t in pairs for x in (h.reshape(-1, h.shape[-1]), t.reshape(-1))]
    with torch.autocast(flat[0].device.type, enabled=False):
        return _LinearCrossEntropy.apply(weight, ignore_index, onednn, *flat)


class FusedHead(Head):
    """Head whose `losses` run `linear_cross_entropies`; `onednn` is set per module by kernels.apply."""

    kernel_of = Head
    onednn: bool = False

    def losses(self, pairs, ignore_index: int = -100):
        return linear_cross_entropies(pairs, self.weight, ignore_index, self.onednn)
