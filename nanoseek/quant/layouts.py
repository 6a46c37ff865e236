"""Weight-only integer layouts for torch's packed CPU kernels (the ones torchao's int8/int4 weight-only
configs call on CPU).

    int8, per output channel (symmetric):      s_n = max_k |W_nk| / 127,   q = round(W / s_n) in [-127, 127]
                                               W ~= q s_n                  kernel: aten._weight_int8pack_mm
    int4, groups of g along the input (asymmetric, min-max):
        s = (max - min) / 15,  z = min + 8 s   per (group, output row)
        q = clamp(round((W - z) / s) + 8, 0, 15)
        W ~= (q - 8) s + z                                                  kernel: aten._weight_int4pack_mm_for_cpu
                                               (q packed by aten._convert_weight_to_int4pack_for_cpu, an opaque
                                               layout; scales and zeros as (K/g, N, 2) in the activations' dtype;
                                               N padded to a multiple of 16, the kernel's block, and cut after)

Scales (and zeros) are rounded to the activations' dtype before q is computed, so that dequantize(quantize(W))
is exactly the weight the kernel multiplies. int4 needs the group size to divide K.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

INT4_GROUPS = (32, 64, 128, 256)
INT4_ROWS = 16  # the int4 kernel's block of output rows


def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> (q int8 (N, K), s (N,) in `dtype`)."""
    w = w.float()
    s = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(dtype).tiny).to(dtype)
    q = (w / s.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, s


def dequantize_int8(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """(q, s) -> W = q s in fp32."""
    return q.float() * s.float()[:, None]


def check_int4(shape: tuple[int, ...], group: int, name: str = "weight") -> None:
    """A clear error where the int4 kernel cannot take a (N, K) weight in groups of `group`."""
    K = shape[1]
    if group not in INT4_GROUPS:
        raise ValueError(f"int4 group size {group} must be one of {INT4_GROUPS}")
    if K % group:
        raise ValueError(f"{name} {tuple(shape)}: the int4 group size {group} does not divide its input "
                         f"dimension {K}; choose a group size from {INT4_GROUPS} that does")


def quantize_int4(w: torch.Tensor, group: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> (q uint8 (N, K) in 0..15, s (N, K/g), z (N, K/g)), s and z in `dtype`."""
    check_int4(tuple(w.shape), group)
    N, K = w.shape
    g = w.float().view(N, K // group, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    s = ((hi - lo) / 15).clamp_min(torch.finfo(dtype).tiny).to(dtype)
    z = (lo + 8 * s.float()).to(dtype)
    q = ((g - z.float()[..., None]) / s.float()[..., None]).round_().add_(8).clamp_(0, 15)
    return q.view(N, K).to(torch.uint8), s, z


def dequantize_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(q, s, z) -> W = (q - 8) s + z in fp32."""
    N, K = q.shape
    group = K // s.shape[1]
    w = (q.float().view(N, -1, group) - 8) * s.float()[..., None] + z.float()[..., None]
    return w.view(N, K)


def pack_int4(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s, z) -> what the kernel reads: the packed values (N', K/2) uint8 and scales-and-zeros (K/g, N', 2),
    N' = N rounded up to a multiple of `INT4_ROWS` (zero rows added)."""
    pad = -q.shape[0] % INT4_ROWS
    q, s, z = (F.pad(t, (0, 0, 0, pad)) for t in (q, s, z))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    return packed, torch.stack([s.T, z.T], dim=-1).contiguous()


def int8_mm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """x (M, K) in s's dtype -> x W^T (M, N)."""
    return torch.ops.aten._weight_int8pack_mm(x, q, s)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, n: int) -> torch.Tensor:
    """x (M, K) in scales_zeros' dtype -> x W^T (M, n) for the first n rows of W; the group size is
    K / scales_zeros.shape[0]."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, x.shape[1] // scales_zeros.shape[0], scales_zeros)
    return y if y.shape[1] == n else y[:, :n]
