"""fp32 GEMMs of CPU training through either GEMM library torch carries, chosen by the `gemm` setting.

torch.mm runs the BLAS torch was built with (MKL in the x86 wheels); torch also carries oneDNN, whose matmul it
reaches through `torch.ops.mkldnn._linear_pointwise(X, W)` = X W^T (inductor's CPU linear). Which is faster
depends on the chip (an EPYC with full-width AVX-512 runs oneDNN at ~2x MKL; with double-pumped AVX-512 they
tie: docs/BENCHMARKS.md), so the library is a setting of the run (`choose` resolves "auto" once, by `rates`,
and the run records the result). With oneDNN, `addmm` computes a @ b in the orientation it runs fastest:
    X = a, W = b^T            where a is row-major (oneDNN copies a strided X to row-major first),
    a b = (b^T a)^T: X = b^T, W = a   where b^T is and a is not,
    otherwise the larger of M, N on the W side (X = a if N >= M).
Products of fewer than `MIN_MACS` multiply-adds stay on BLAS (oneDNN's fixed cost is ~15 us a call).
`grouped` and `grouped_wgrad` are the routed experts' products per expert: the first multiple of `ROWS` rows of
each expert's block through oneDNN, the rest through BLAS, so that oneDNN meets the same shapes every step and
its primitive cache serves them. `Linear` is nn.Linear whose training products (y = x W^T, dX = dY W,
dW = dY^T X) run through these.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

MIN_MACS = 1 << 22  # M N K below this: BLAS (oneDNN breaks even near 128^3 on 2 threads)
MARGIN = 1.5  # "auto" picks oneDNN where it measures at least this much faster than BLAS: where the two are
# close (1.1-1.3x on a Zen 4) whole steps tie, and a lower margin only makes the choice differ between hosts' hours
LIBRARIES = ("blas", "onednn")
ROWS = 64  # oneDNN runs the experts' row blocks in multiples of this (`_rows`)


def onednn_product():
    """X, W -> X W^T through oneDNN, or None where this torch has no oneDNN."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return (lambda x, w: op(x, w, None, "none", [], "")) if torch.backends.mkldnn.is_available() else None


_ONEDNN = onednn_product()


def rates(sizes: tuple[int, ...] = (1024,), repeats: int = 5, dtype=None, device=None) -> dict[str, float]:
    """Matmul FLOP/s per GEMM library on `device` (default cpu): the best of `repeats` timed n^3 products for
    each n in `sizes` (2 n^3 FLOPs each). On a CPU in fp32 both libraries torch carries, BLAS (torch.mm) and,
    where present, oneDNN; elsewhere torch.mm. dtype: float32 on CPU, bfloat16 on CUDA unless given. The
    libraries take turns within each round, after two untimed runs each, so that a slow minute of a shared host
    slows both."""
    device = torch.device(device or "cpu")
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    products = {"blas": torch.mm}
    if device.type == "cpu" and dtype == torch.float32 and _ONEDNN is not None:
        products["onednn"] = _ONEDNN  # X W^T: the same 2 n^3 FLOPs
    best = dict.fromkeys(products, 0.0)
    with torch.inference_mode():
        for n in sizes:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            for product in [*products.values()] * 2:
                product(a, b)
            sync()
            for _ in range(repeats):
                for name, product in products.items():
                    t0 = time.perf_counter()
                    product(a, b)
                    sync()
                    best[name] = max(best[name], 2 * n**3 / (time.perf_counter() - t0))
    return best


def choose(setting: str) -> str:
    """The `gemm` setting ("auto", "blas" or "onednn") -> the library a run uses. "auto": oneDNN where `rates`
    measures it `MARGIN` times faster than BLAS; "onednn" without oneDNN in this torch is an error."""
    if setting not in ("auto", *LIBRARIES):
        raise ValueError(f"kernels.gemm={setting!r} must be one of auto, {', '.join(LIBRARIES)}")
    if setting == "onednn" and _ONEDNN is None:
        raise ValueError("kernels.gemm='onednn': this torch has no oneDNN; use 'blas' or 'auto'")
    if setting != "auto":
        return setting
    if _ONEDNN is None:
        return "blas"
    r = rates(repeats=10)
    return "onednn" if r["onednn"] >= MARGIN * r["blas"] else "blas"


def addmm(out: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor, beta: int = 0, alpha: float = 1.0,
          onednn: bool = False) -> torch.Tensor:
    """beta out + alpha a b for fp32 a (M, K), b (K, N), beta 0 or 1, into `out` when given (a new tensor when
    None): BLAS, or oneDNN where `onednn` and the product is large enough (module docstring)."""
    (M, K), N = a.shape, b.shape[1]
    if not onednn or M * N * K < MIN_MACS or a.device.type != "cpu":
        if out is None:
            return torch.mm(a, b).mul_(alpha) if alpha != 1 else torch.mm(a, b)
        return torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    if alpha != 1:  # scale the smaller operand
        a, b = (a * alpha, b) if a.numel() <= b.numel() else (a, b * alpha)
    xa, xb = a.is_contiguous(), b.T.is_contiguous()  # oneDNN copies a non-row-major X first
    c = _ONEDNN(a, b.T) if xa or not xb and N >= M else _ONEDNN(b.T, a).T
    if out is None:
        return c.contiguous()
    return out.add_(c) if beta else out.copy_(c)


def grouped(a: torch.Tensor, w: torch.Tensor, counts: list[int], transposed: bool = True,
            onednn: bool = False) -> torch.Tensor:
    """Row block j of a (counts[j] rows) times w[j]^T (`transposed`) or w[j]: the experts' forward (x_j W_j^T)
    and dX (dy_j W_j). One F.grouped_mm on BLAS; with oneDNN, per expert, `_rows` rows through oneDNN and the
    rest through BLAS."""
    if not onednn:
        return F.grouped_mm(a, w.transpose(1, 2) if transposed else w,
                            offs=torch.tensor(counts, device=a.device).cumsum(0).to(torch.int32))
    out = a.new_empty(a.shape[0], w.shape[1] if transposed else w.shape[2])
    start = 0
    for j, n in enumerate(counts):
        m, w_j = _rows(n), w[j].T if transposed else w[j]
        if m:
            addmm(out[start:start + m], a[start:start + m], w_j, onednn=True)
        if n > m:
            torch.mm(a[start + m:start + n], w_j, out=out[start + m:start + n])
        start += n
    return out


def grouped_wgrad(dy: torch.Tensor, x: torch.Tensor, counts: list[int], dw: torch.Tensor,
                  onednn: bool = False) -> torch.Tensor:
    """dw[j] = dY_j^T X_j over each expert's row block (zeros for an expert without rows), into dw (E, N, K)."""
    start = 0
    for j, n in enumerate(counts):
        m = _rows(n) if onednn else 0
        if m:
            addmm(dw[j], dy[start:start + m].T, x[start:start + m], onednn=True)
        if n > m:
            torch.addmm(dw[j], dy[start + m:start + n].T, x[start + m:start + n], beta=1 if m else 0, out=dw[j])
        if n == 0:
            dw[j].zero_()
        start += n
    return dw


def _rows(n: int) -> int:
    """The rows of an n-row expert block that go to oneDNN: a multiple of ROWS. oneDNN builds a primitive for
    each new shape (~0.3-0.5 ms), and the experts' row counts change every step; as multiples of ROWS they
    repeat, and oneDNN's primitive cache serves them."""
    return n - n % ROWS


class _Linear(torch.autograd.Function):
    """y = x W^T, dX = dY W, dW = dY^T X through `addmm`; where the row count T is not a multiple of `ROWS`
    (variable lengths: GRPO's micro-batches), as one expert's block (`grouped`), so that oneDNN meets
    repeating shapes there too."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        x2 = x.reshape(-1, x.shape[-1])
        T = x2.shape[0]
        y = addmm(None, x2, w.T, onednn=True) if _rows(T) == T else grouped(x2, w[None], [T], onednn=True)
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dy, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
        T = x2.shape[0]
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = (addmm(None, dy, w, onednn=True) if _rows(T) == T
                  else grouped(dy, w[None], [T], transposed=False, onednn=True)).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = (addmm(None, dy.T, x2, onednn=True) if _rows(T) == T
                  else grouped_wgrad(dy, x2, [T], w.new_empty(1, *w.shape), onednn=True)[0])
        return dx, dw


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, onednn: bool = False) -> torch.Tensor:
    """F.linear(x, w, bias); through oneDNN (`_Linear`) where `onednn`, training on CPU in fp32 without a bias or
    autocast, and the product is large enough."""
    if (onednn and bias is None and x.device.type == "cpu" and x.dtype == w.dtype == torch.float32
            and torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)
            and not torch.is_autocast_enabled("cpu") and x.numel() * w.shape[0] >= MIN_MACS):
        return _Linear.apply(x, w)
    return F.linear(x, w, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict names) whose training products run through `linear`; `onednn`
    is set per module by kernels.apply."""

    kernel_of = nn.Linear  # computes what nn.Linear computes (the decoding plan reads it as one)
    onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.onednn)
