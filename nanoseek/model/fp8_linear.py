"""FP8 GEMMs for training and inference, V3's recipe (DeepSeek-V3 report §3.3).

Each FP8 Linear runs its three GEMMs on e4m3 inputs with fine-grained scales (nanoseek.model.fp8) and fp32
accumulation, C[m, n] = sum_kb (A_kb . B_kb^T) a_s[m, kb] b_s[n, kb] over 128-wide K blocks:

    Fprop  Y  = X W^T     X: 1x128 tiles along in       W: 128x128 blocks
    Dgrad  dX = dY W      dY: 1x128 tiles along out     W: the same blocks (the cached FP8 weight, transposed)
    Wgrad  dW = dY^T X    dY, X: 1x128 tiles along the tokens (the reduction dim); X is the cached FP8
                          activation, dequantized and re-quantized 1x128 -> 128x1 (DeepSeek-V3 report §3.5.2)

Backends (`Recipe.backend`, "auto" picks per call):
- "emulate" (CPU, GPUs without the kernel): quantize, dequantize, one fp32 matmul: the same e4m3 values and
  scales as the FP8 kernel; fp32 summation throughout stands in for the promotion every 128 K elements.
- "scaled_mm" (CUDA SM90): `F.scaled_mm` (torch._scaled_mm_v2) with BlockWise1x128 / BlockWise128x128
  scales and bf16 output; operands are zero-padded to multiples of 128 first (same scales, same products).
Routed experts (`fp8_grouped_mm`) quantize per expert (128x128 blocks of each expert's gate, up and down
matrices) and per 1x128 token tile, feeding the grouped GEMM, emulated on every device: torch has no
blockwise `_scaled_grouped_mm`. For their Wgrad each expert's tokens start a new 128-token tile (DeepGEMM's
contiguous layout aligns every expert's rows to 128).

`to_fp8(model)` converts the MLA projections, dense MLPs, shared and routed experts (`FP8_WEIGHTS`).
Kept in high precision as in V3: embedding, lm_head, router gate, norms, the attention core (SDPA and the
absorbed decoding path, which reads kv_b_proj's master weight), MTP's eh_proj. Master weights and
gradients stay fp32; outputs are fp32 (bf16 under autocast). Left out: E5M6 inputs of o_proj, FP8 caching
of the SwiGLU input with recomputation, FP8 dispatch (no expert parallelism here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.fp8 import AMAX_FLOOR, FP8_WEIGHTS, SCALE_FMTS, dequantize_blockwise, quantize_blockwise
from nanoseek.model.moe import Experts, grouped_mm_ok

BACKENDS = ("auto", "emulate", "scaled_mm")


@dataclass(frozen=True)
class Recipe:
    """scale_fmt: "fp32" or "ue8m0" (power-of-two scales); block: 128 in V3 (smaller only for tests);
    backend: "auto" (scaled_mm where it runs, else emulate), "emulate" or "scaled_mm"."""

    scale_fmt: str = "fp32"
    backend: str = "auto"
    block: int = 128

    def __post_init__(self):
        if self.scale_fmt not in SCALE_FMTS:
            raise ValueError(f"fp8 scale_fmt={self.scale_fmt!r} must be one of {SCALE_FMTS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"fp8 backend={self.backend!r} must be one of {BACKENDS}")
        if self.block < 1:
            raise ValueError(f"fp8 block={self.block} must be >= 1")


class Operand(NamedTuple):
    """One FP8 GEMM operand in (rows, k) orientation, k the reduction dim: e4m3 values and block scales."""

    q: torch.Tensor
    s: torch.Tensor
    block: tuple[int, int]

    def dequantize(self) -> torch.Tensor:
        return dequantize_blockwise(self.q, self.s, self.block)

    def t(self) -> Operand:
        """The transpose of a weight operand (square blocks: W^T's blocks are W's blocks, transposed)."""
        assert self.block[0] == self.block[1], "only square blocks transpose into blocks of the same recipe"
        return Operand(self.q.t(), self.s.t(), self.block)


def quantize_operand(x: torch.Tensor, block: tuple[int, int], recipe: Recipe, grad: bool = False) -> Operand:
    """Quantize a GEMM input; gradients have no amax floor (see nanoseek.model.fp8)."""
    return Operand(*quantize_blockwise(x, block, recipe.scale_fmt, 0.0 if grad else AMAX_FLOOR), block)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)  # (also on fake tensors)


def _scale_arg(op: Operand) -> torch.Tensor:
    """Scales in the layout torch._scaled_mm_v2 checks: 1x128 (rows, k/128) column-major; 128x128 as
    (round_up(k/128, 4), rows/128) column-major."""
    if op.block[0] == 1:
        return _contiguous(op.s.t()).t()
    return _contiguous(F.pad(op.s, (0, -op.s.shape[1] % 4))).t()


def gemm(a: Operand, b: Operand, scaled_mm: bool) -> torch.Tensor:
    """A (m, k), B (n, k) -> A B^T (m, n): fp32 emulation, or F.scaled_mm (bf16 out; dims multiples of 128)."""
    if not scaled_mm:
        return a.dequantize() @ b.dequantize().t()
    kinds = {(1, 128): F.ScalingType.BlockWise1x128, (128, 128): F.ScalingType.BlockWise128x128}
    return F.scaled_mm(_contiguous(a.q), _contiguous(b.q).t(), _scale_arg(a), kinds[a.block], _scale_arg(b),
                       kinds[b.block], output_dtype=torch.bfloat16)


@functools.cache
def _scaled_mm_runs(device: torch.device) -> bool:
    """Blockwise F.scaled_mm runs on this device (Hopper, SM90): tried once on a 128^3 product."""
    if device.type != "cuda" or not hasattr(F, "scaled_mm") or torch.cuda.get_device_capability(device)[0] != 9:
        return False
    try:
        x = torch.ones(128, 128, device=device)
        r = Recipe()
        gemm(quantize_operand(x, (1, 128), r), quantize_operand(x, (128, 128), r), scaled_mm=True)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def uses_scaled_mm(recipe: Recipe, x: torch.Tensor) -> bool:
    if recipe.backend == "emulate":
        return False
    ok = recipe.block == 128 and x.is_cuda and _scaled_mm_runs(x.device)
    if recipe.backend == "scaled_mm" and not ok:
        raise ValueError(f"fp8 backend='scaled_mm' needs block 128 and a CUDA GPU where blockwise F.scaled_mm runs "
                         f"(SM90); this tensor is on {x.device}")
    return ok


def _pad(x: torch.Tensor, b: int) -> torch.Tensor:
    return F.pad(x, (0, -x.shape[1] % b, 0, -x.shape[0] % b))


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, recipe: Recipe):
        out_dtype, shape = _out_dtype(x), x.shape
        fast, b = uses_scaled_mm(recipe, x), recipe.block
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, shape[-1])
            t, (n, k) = x2.shape[0], w.shape
            if fast:
                x2, w = _pad(x2, b), _pad(w, b)
            xo = quantize_operand(x2, (1, b), recipe)  # Fprop: X per 1x128 tile, W per 128x128 block
            wo = quantize_operand(w, (b, b), recipe)
            y = gemm(xo, wo, fast)[:t, :n]
        ctx.save_for_backward(xo.q, xo.s, wo.q, wo.s)  # the cached activation and weight are FP8
        ctx.meta = (recipe, fast, shape, x.dtype, w.dtype)
        return y.to(out_dtype).reshape(*shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        recipe, fast, shape, x_dtype, w_dtype = ctx.meta
        b, k = recipe.block, shape[-1]
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            g = dy.reshape(-1, dy.shape[-1])
            t, n = g.shape
            if fast:
                g = _pad(g, b)
            if ctx.needs_input_grad[0]:  # Dgrad: dY per 1x128 tile along out, times the FP8 weight
                dx = gemm(quantize_operand(g, (1, b), recipe, grad=True), Operand(wq, ws, (b, b)).t(), fast)
                dx = dx[:t, :k].to(x_dtype).reshape(shape)
            if ctx.needs_input_grad[1]:  # Wgrad: dY^T and X^T tiled along the tokens
                gt = quantize_operand(g.t(), (1, b), recipe, grad=True)
                xt = quantize_operand(Operand(xq, xs, (1, b)).dequantize().t(), (1, b), recipe)
                dw = gemm(gt, xt, fast)[:n, :k].to(w_dtype)
        return dx, dw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, recipe: Recipe = Recipe()) -> torch.Tensor:
    """F.linear(x, w) (x (..., in), w (out, in)) with V3's FP8 Fprop, Dgrad and Wgrad."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"fp8_linear: x {tuple(x.shape)} and weight {tuple(w.shape)} do not fit (in = x.shape[-1])")
    return _FP8Linear.apply(x, w, recipe)


def _aligned_rows(counts: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows grouped by expert -> their index in a layout where each group is padded to a multiple of b rows;
    returns (index (T,), padded counts (E,))."""
    padded = (counts + b - 1) // b * b
    group = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    start, start_padded = counts.cumsum(0) - counts, padded.cumsum(0) - padded
    rows = torch.arange(len(group), device=counts.device)
    return start_padded[group] + rows - start[group], padded


def _wgrad_grouped(a: torch.Tensor, b: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """a (n, T), b (T, k), T grouped by counts -> (E, n, k): a_e b_e per group."""
    if grouped_mm_ok(a):
        return F.grouped_mm(a.contiguous(), b.contiguous(), offs=counts.cumsum(0).to(torch.int32))
    ends = counts.cumsum(0).tolist()
    return torch.stack([a[:, e - c:e] @ b[e - c:e] for e, c in zip(ends, counts.tolist())])


class _FP8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, xs, w, counts, parts: int, recipe: Recipe):
        out_dtype, b = _out_dtype(xs), recipe.block
        with torch.autocast(xs.device.type, enabled=False):
            xo = quantize_operand(xs, (1, b), recipe)
            # (E, out, in): each of the `parts` stacked matrices per expert (gate, up) has its own blocks
            wo = quantize_operand(w.unflatten(1, (parts, -1)), (b, b), recipe)
            y = Experts._mm(xo.dequantize(), wo.dequantize().flatten(1, 2), counts)
        ctx.save_for_backward(xo.q, xo.s, wo.q, wo.s, counts)
        ctx.meta = (recipe, xs.dtype, w.dtype)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, dy):
        xq, xs, wq, ws, counts = ctx.saved_tensors
        recipe, x_dtype, w_dtype = ctx.meta
        b = recipe.block
        dx = dw = None
        with torch.autocast(dy.device.type, enabled=False):
            dy = dy.contiguous()
            if ctx.needs_input_grad[0]:  # Dgrad: dY per 1x128 tile, times each expert's FP8 weight
                g = quantize_operand(dy, (1, b), recipe, grad=True).dequantize()
                w = Operand(wq, ws, (b, b)).dequantize().flatten(1, 2)  # (E, out, in)
                dx = Experts._mm(g, w.transpose(1, 2), counts).to(x_dtype)
            if ctx.needs_input_grad[1]:  # Wgrad: per expert, dY^T and X^T tiled along its own tokens
                index, padded = _aligned_rows(counts, b)
                x = Operand(xq, xs, (1, b)).dequantize()
                gp = dy.new_zeros(int(padded.sum()), dy.shape[1], dtype=torch.float32).index_copy_(0, index, dy.float())
                xp = x.new_zeros(gp.shape[0], x.shape[1]).index_copy_(0, index, x)
                gt = quantize_operand(gp.t(), (1, b), recipe, grad=True).dequantize()
                xt = quantize_operand(xp.t(), (1, b), recipe).dequantize()
                dw = _wgrad_grouped(gt, xt.t(), padded).to(w_dtype)
        return dx, dw, None, None, None


def fp8_grouped_mm(xs: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, recipe: Recipe = Recipe(),
                   parts: int = 1) -> torch.Tensor:
    """xs (T, in) sorted by expert (counts (E,) rows each), w (E, out, in) -> (T, out): rows of expert e times
    w[e]^T, in FP8. parts: w[e] stacks that many matrices quantized separately (2 for gate_up_proj)."""
    return _FP8GroupedMM.apply(xs, w, counts, parts, recipe)


class FP8Linear(nn.Linear):
    """nn.Linear whose product runs through `fp8_linear` (same parameters and state-dict names)."""

    fp8: Recipe = Recipe()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.fp8)
        return y if self.bias is None else y + self.bias


class FP8Experts(Experts):
    """Routed experts whose grouped GEMMs run through `fp8_grouped_mm`."""

    fp8: Recipe = Recipe()

    def _product(self, x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor,
                 token: torch.Tensor | None = None) -> torch.Tensor:
        xs = x if token is None else x.index_select(0, token)
        return fp8_grouped_mm(xs, w, counts, self.fp8, parts=2 if w is self.gate_up_proj else 1)


def to_fp8(model: nn.Module, recipe: Recipe = Recipe()) -> nn.Module:
    """Switch, in place, the GEMMs V3 runs in FP8 (`FP8_WEIGHTS`: MLA projections, dense MLPs, shared and routed
    experts) to FP8Linear / FP8Experts; parameters, names and the other modules are untouched."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and FP8_WEIGHTS.search(f"{name}.weight"):
            m.__class__, m.fp8 = FP8Linear, recipe
        elif isinstance(m, Experts):
            m.__class__, m.fp8 = FP8Experts, recipe
    return model
