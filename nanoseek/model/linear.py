"""Linear layers with a decoding fast path on CPU (docs/LOG.md, "decoding speed").

Decoding multiplies a few rows by each weight: memory-bound GEMVs. This MKL runs them in ways that matter:
- x W^T (what F.linear computes) for 2-64 rows is 1.3-2x slower than the same product as W x^T on the
  row-major (out, in) weight; so is a per-expert loop of x W^T (grouped_mm on CPU) against W x^T.
- one row is a single-threaded GEMV (~15 GB/s); splitting a large weight's rows over two threads reads it at
  twice that (the output head: 4.8 -> 2.5 ms at `small`).
Training (autograd on), other devices and many rows keep F.linear. Results equal F.linear's up to summation
order.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 64  # up to this many rows, W x^T beats x W^T
SPLIT_MIN = 1 << 22  # one row times a weight of at least this many elements (16 MiB fp32): split over threads

_pool: ThreadPoolExecutor | None = None


def few_rows(x: torch.Tensor, rows: int = FEW_ROWS) -> bool:
    """Whether x (..., in) is a decoding-sized input for the fast path: CPU, no autograd, <= rows rows."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and x.numel() <= rows * x.shape[-1]


def matmul_wt(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (n, in) @ w (out, in)^T computed as (w x^T)^T; one row and a large w: the rows of w split over
    the intra-op threads, each a single-threaded GEMV."""
    threads = torch.get_num_threads()
    if x.shape[0] > 1 or threads < 2 or w.numel() < SPLIT_MIN:
        return (w @ x.T).T
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="nanoseek-gemv")
    out = torch.empty(w.shape[0], 1, dtype=torch.result_type(x, w), device=x.device)
    parts = w.chunk(threads)
    bounds = [0]
    for p in parts:
        bounds.append(bounds[-1] + p.shape[0])
    xt = x.T
    jobs = [_pool.submit(_mm_no_grad, p, xt, out=out[bounds[i + 1]:bounds[i + 2]]) for i, p in enumerate(parts[1:])]
    torch.mm(parts[0], xt, out=out[: bounds[1]])
    for j in jobs:
        j.result()
    return out.T


@torch.no_grad()  # grad mode is per thread: the caller's no_grad does not reach the pool's threads
def _mm_no_grad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return torch.mm(a, b, out=out)


class Linear(nn.Linear):
    """nn.Linear with the decoding fast path above (same parameters, same state-dict names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not few_rows(x) or x.dtype != self.weight.dtype:
            return F.linear(x, self.weight, self.bias)
        y = matmul_wt(x.reshape(-1, x.shape[-1]), self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.weight.shape[0])
