"""GEMV helpers: few-row products x W^T computed the way this CPU streams weights fastest (docs/LOG.md,
"decoding speed").

Decoding multiplies a few rows by each weight: memory-bound GEMVs. This MKL runs them in ways that matter:
- x W^T (what F.linear computes) for 2-64 rows is 1.3-2x slower than the same product as W x^T on the
  row-major (out, in) weight; so is a per-expert loop of x W^T (grouped_mm on CPU) against W x^T.
- one row is a single-threaded GEMV (~13 GB/s); as one `bmm` over the weight's rows cut into one block per
  intra-op thread, each thread runs a GEMV on its block and the weight streams at ~25 GB/s (2 threads).
The right-hand operand (x^T, or its broadcast over the blocks) is built once per input by `rows_t`, so the
products that read the same rows can share it (plan.py). Results equal F.linear's up to summation order
(tests/infer/fastpath/test_gemv.py).
"""

from __future__ import annotations

import torch


def rows_t(x: torch.Tensor) -> torch.Tensor:
    """x (n, in) -> the operand of `mul_wt`: x^T (in, n), or for one row on CPU its broadcast (threads, in, 1)
    over one row block of the weight per intra-op thread (those threads are CPU threads)."""
    threads = torch.get_num_threads()
    if x.shape[0] > 1 or threads < 2 or x.device.type != "cpu":
        return x.T
    k, st = x.shape[1], x.stride(1)  # strides of x.T[None].expand(threads, -1, -1), in one op
    return x.as_strided((threads, k, 1), (0, st, k * st))


def blocked(w: torch.Tensor, blocks: int) -> torch.Tensor | None:
    """w (out, in) viewed as (blocks, out/blocks, in) for `mul_wt`'s one-row bmm; None where it does not split."""
    if blocks < 2 or w.shape[0] % blocks or not w.is_contiguous():
        return None
    return w.view(blocks, -1, w.shape[1])


def each_rows_t(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """rows_t of every row of x (n, in) on its own: x[i:i+1] for i < n, in one view and one unbind."""
    threads, (n, k), (s0, s1) = torch.get_num_threads(), x.shape, x.stride()
    if threads < 2 or x.device.type != "cpu":
        return x[:, :, None].unbind(0)
    return x.as_strided((n, threads, k, 1), (s0, 0, s1, k * s1)).unbind(0)


def mul_wt(xt: torch.Tensor, w: torch.Tensor, wb: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """x (n, in) @ w (out, in)^T computed as (w x^T)^T, from xt = rows_t(x); wb: w already `blocked`;
    out: a contiguous (out,) or (1, out) tensor to write a one-row product into."""
    if xt.dim() == 3:
        wb = wb if wb is not None and wb.shape[0] == xt.shape[0] else blocked(w, xt.shape[0])
        if wb is not None:  # (blocks, out/blocks, 1)
            return torch.bmm(wb, xt, out=None if out is None else out.view(wb.shape[0], -1, 1)).view(1, -1)
        xt = xt[0]
    return torch.mm(w, xt, out=None if out is None else out.view(-1, 1)).T


def matmul_wt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, in) @ w (out, in)^T through `mul_wt` (its operand built here)."""
    return mul_wt(rows_t(x), w)
