"""DeepSeek-V3's fine-grained FP8 format (DeepSeek-V3 report §3.3.2; the released checkpoints' `weight_scale_inv`).

A tensor is cut into blocks over its last two dims, each block stored as e4m3 values with one fp32 scale:

    weights      W (out, in):  128 x 128 blocks       scales (ceil(out/128), ceil(in/128))
    activations  X (t, in):    1 x 128 tiles          scales (t, ceil(in/128))   per token, per 128 channels
    s = max(amax_block, floor) / 448                  (448: the largest finite float8_e4m3fn)
    s = 2^ceil(log2 s)        with scale_fmt="ue8m0"  (power-of-two scales, V3.1's `scale_fmt`)
    Q = float8_e4m3fn(X / s)  (round to nearest);     X ~= Q * s, each scale broadcast over its block

Edge blocks: a block cut by the tensor's end takes the scale of the elements it has, which is what V3's
zero-padding to 128 gives (zeros do not change the max); V3's act_quant instead requires in % 128 == 0.
floor: V3's act_quant clamps amax at 1e-4 (`AMAX_FLOOR`); gradients use 0 (only the smallest normal fp32
scale): those of a token-averaged loss are often far below 1e-4 (nano: max |dY| 4e-7..4e-3) and would lose range.
In checkpoints S is `weight_scale_inv` (DeepSeek's name: it multiplies on dequantization).
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
SCALE_FMTS = ("fp32", "ue8m0")
# the weights V3 stores in FP8 (HF names): MLA projections and every SwiGLU (dense, shared and routed experts);
# embedding, lm_head, norms, router gate and bias, and MTP's eh_proj stay in high precision
FP8_WEIGHTS = re.compile(r"(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                         r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$")


def _blocks(block: int | tuple[int, int]) -> tuple[int, int]:
    return (block, block) if isinstance(block, int) else tuple(block)


def _grid(shape, block: tuple[int, int]) -> tuple[int, int]:
    return -(-shape[-2] // block[0]), -(-shape[-1] // block[1])


def _in_blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x (..., m, n) -> (..., rows, bm, cols, bn), zero-padded to whole blocks (zeros leave every max unchanged)."""
    rows, cols = _grid(x.shape, block)
    pad_m, pad_n = rows * block[0] - x.shape[-2], cols * block[1] - x.shape[-1]
    x = F.pad(x, (0, pad_n, 0, pad_m)) if pad_m or pad_n else x.contiguous()
    return x.unflatten(-1, (cols, block[1])).unflatten(-3, (rows, block[0]))


def _from_blocks(x: torch.Tensor, shape) -> torch.Tensor:
    """The inverse of _in_blocks: (..., rows, bm, cols, bn) -> (..., m, n), padding dropped."""
    x = x.flatten(-2).flatten(-3, -2)
    return x if x.shape[-2:] == shape[-2:] else x[..., : shape[-2], : shape[-1]].contiguous()


@functools.cache
def _e4m3_values(device: torch.device) -> torch.Tensor:
    """All 256 float8_e4m3fn codes as fp32 (torch's own conversion), a lookup table on `device`."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn).float()


def e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """q.float(), exactly, by table lookup: several times faster than the element-wise cast on CPU."""
    codes = q.view(torch.uint8).flatten().int()
    return _e4m3_values(q.device).index_select(0, codes).view(q.shape)


def block_scale(amax: torch.Tensor, scale_fmt: str = "fp32", amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """The fp32 dequantization scale of a block from its max |x|: max(amax, floor) / 448 [rounded up to 2^k]."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt={scale_fmt!r} must be one of {SCALE_FMTS}")
    s = (amax.float().clamp_min(amax_floor) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp2(torch.ceil(torch.log2(s))) if scale_fmt == "ue8m0" else s


def quantize_blockwise(x: torch.Tensor, block: int | tuple[int, int] = 128, scale_fmt: str = "fp32",
                       amax_floor: float = AMAX_FLOOR) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., m, n) -> (float8_e4m3fn (..., m, n), fp32 scales (..., ceil(m/bm), ceil(n/bn))), blocks bm x bn
    over the last two dims: block=128 for weights, (1, 128) for activations (1 x 128 tiles)."""
    bm, bn = _blocks(block)
    if x.dim() < 2 or not x.is_floating_point():
        raise ValueError(f"quantize_blockwise needs a floating-point tensor of >= 2 dims, got {x.dtype} "
                         f"{tuple(x.shape)}")
    blocks = _in_blocks(x.float(), (bm, bn))
    amax = torch.maximum(blocks.amax(dim=(-3, -1)), -blocks.amin(dim=(-3, -1)))  # two reads, no |x| copy
    scale = block_scale(amax, scale_fmt, amax_floor)
    return _from_blocks((blocks / scale[..., :, None, :, None]).to(torch.float8_e4m3fn), x.shape), scale


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: int | tuple[int, int] = 128,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(float8 values (..., m, n), block scales) -> x in `dtype`: x = q * s."""
    bm, bn = _blocks(block)
    if q.dim() < 2 or scale.shape != (*q.shape[:-2], *_grid(q.shape, (bm, bn))):
        raise ValueError(f"FP8 tensor {tuple(q.shape)} in {bm}x{bn} blocks needs block scales of shape "
                         f"{(*q.shape[:-2], *_grid(q.shape, (bm, bn))) if q.dim() >= 2 else '?'}, "
                         f"got {tuple(scale.shape)}")
    blocks = _in_blocks(e4m3_to_float(q), (bm, bn)).mul_(scale.float()[..., :, None, :, None])
    return _from_blocks(blocks, q.shape).to(dtype)


def fake_quantize(x: torch.Tensor, block: int | tuple[int, int] = 128, scale_fmt: str = "fp32",
                  amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """dq(q(x)) in fp32: the values an FP8 GEMM multiplies."""
    return dequantize_blockwise(*quantize_blockwise(x, block, scale_fmt, amax_floor), block)


def quantize_checkpoint(tensors: dict[str, torch.Tensor], block: int = 128,
                        scale_fmt: str = "fp32") -> dict[str, torch.Tensor]:
    """For export: every weight V3 stores in FP8 (`FP8_WEIGHTS`) becomes `X.weight` (e4m3) plus
    `X.weight_scale_inv` (fp32, one per block x block); the other tensors are kept as they are."""
    out = {}
    for key, t in tensors.items():
        if FP8_WEIGHTS.search(key) and t.dim() == 2:
            out[key], out[key + "_scale_inv"] = quantize_blockwise(t, block, scale_fmt)
        else:
            out[key] = t
    return out
