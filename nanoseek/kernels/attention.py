"""Causal attention for MLA on CPU: o = softmax(q k^T * scale + M) v, M_ij = -inf where key j > query i.

`BlockedMLA` is model.mla.MLA whose `attend` runs, on CPU, one of two kernels that compute the same function
as the reference's causal SDPA (tests/kernels/test_attention.py):
- `BlockCausal`, training in fp32 / fp64 at `BLOCK_RANGE` lengths: query blocks of `BLOCK` rows against the
  keys up to each block's end, so the masked upper triangle is computed inside the diagonal blocks only; the
  scores of a block sit in one reused buffer, the softmax runs in place, and the backward recomputes P from the
  saved log-sum-exp, as FlashAttention does (Dao et al. 2022, section 3.1):
      P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,
      dK = scale dS^T Q
  The exponentials are base 2, the scores scaled by log2(e) inside their GEMM (2^(x log2 e) = e^x): exp2 runs
  ~3.5x faster than exp in torch's CPU build. Its batched GEMMs run near BLAS's rate where the CPU flash
  kernel's small tiles do not; outside the range the flash kernel is as fast or faster (docs/LOG.md).
- otherwise SDPA's fused (flash) kernel, which on CPU needs equal K and V head dims: V is zero-padded from
  d_v to d_qk (the padded output columns are zeros and are dropped).
Shapes: q, k (b, h, s, d_qk), v (b, h, s, d_v), o (b, h, s, d_v); B = b h in the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.mla import MLA

BLOCK = 64  # query rows per block: the diagonal blocks compute (1 + BLOCK / s) / 2 of the full square
BLOCK_RANGE = (128, 1024)  # sequence lengths where `BlockCausal` beats the CPU flash kernel (fwd + bwd)
LOG2E = 1.4426950408889634  # log2(e): e^x = 2^(x LOG2E)


class BlockedMLA(MLA):
    """MLA whose causal attention runs `causal_attention` (the module docstring)."""

    kernel_of = MLA

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return causal_attention(q, k, v, self.scale)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q, k (b, h, s, d_qk), v (b, h, s, d_v) -> o (b, h, s, d_v), on CPU through the kernel the module docstring
    names; elsewhere SDPA."""
    b, h, s, d_v = v.shape
    if q.device.type == "cpu":
        if (BLOCK_RANGE[0] <= s <= BLOCK_RANGE[1] and q.dtype in (torch.float32, torch.float64)
                and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            o = BlockCausal.apply(q.reshape(b * h, s, -1), k.reshape(b * h, s, -1), v.reshape(b * h, s, d_v), scale)
            return o.view(b, h, s, d_v)
        if q.shape[-1] > d_v:
            v = F.pad(v, (0, q.shape[-1] - d_v))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)[..., :d_v]


def _scores(q: torch.Tensor, k: torch.Tensor, i0: int, i1: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """S = scale q[i0:i1] k[:i1]^T (B, n, i1) written into `out`'s memory, -inf above the diagonal."""
    B, n = q.shape[0], i1 - i0
    S = out[: B * n * i1].view(B, n, i1)
    torch.baddbmm(S, q[:, i0:i1], k[:, :i1].transpose(1, 2), beta=0, alpha=scale, out=S)
    S[:, :, i0:].masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu_(1), float("-inf"))
    return S


class BlockCausal(torch.autograd.Function):
    """Causal attention by query blocks (module docstring); q, k (B, s, d_qk), v (B, s, d_v) -> o (B, s, d_v)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        B, s, _ = q.shape
        o, lse = q.new_empty(B, s, v.shape[-1]), q.new_empty(B, s, 1)  # lse: base 2, of log2(e) S
        buf = q.new_empty(B * min(BLOCK, s) * s)
        for i0 in range(0, s, BLOCK):
            i1 = min(i0 + BLOCK, s)
            S = _scores(q, k, i0, i1, scale * LOG2E, buf)
            m = S.amax(dim=-1, keepdim=True)
            l = S.sub_(m).exp2_().sum(dim=-1, keepdim=True)  # noqa: E741 (the paper's l)
            o[:, i0:i1] = torch.bmm(S, v[:, :i1]).div_(l)
            lse[:, i0:i1] = m + l.log2()
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        B, s, _ = q.shape
        do = do.contiguous()
        D = (do * o).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(P * dP)
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        half = B * min(BLOCK, s) * s
        buf = q.new_empty(2 * half)
        for i0 in range(0, s, BLOCK):
            i1 = min(i0 + BLOCK, s)
            P = _scores(q, k, i0, i1, ctx.scale * LOG2E, buf[:half]).sub_(lse[:, i0:i1]).exp2_()
            dv[:, :i1] += torch.bmm(P.transpose(1, 2), do[:, i0:i1])
            dS = buf[half: half + P.numel()].view_as(P)
            torch.baddbmm(dS, do[:, i0:i1], v[:, :i1].transpose(1, 2), beta=0, out=dS)  # dP
            dS.sub_(D[:, i0:i1]).mul_(P)
            dq[:, i0:i1] = torch.bmm(dS, k[:, :i1])
            dk[:, :i1] += torch.bmm(dS.transpose(1, 2), q[:, i0:i1])
        return dq.mul_(ctx.scale), dk.mul_(ctx.scale), dv, None
