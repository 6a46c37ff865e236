"""DeepSeek-V3's fine-grained FP8 format (paper section 3.3.2; the released checkpoints).

A weight W (out, in) is stored as e4m3 values with one fp32 scale per 128 x 128 block:

    s_ij = max |W_block_ij| / 448          (448: the largest finite float8_e4m3fn)
    Q    = float8_e4m3fn(W / s)            `weight`
    S    = s                               `weight_scale_inv` (ceil(out/128), ceil(in/128)), fp32
    W ~= Q * S (each scale broadcast over its block)

The checkpoint name `weight_scale_inv` is DeepSeek's: it multiplies on dequantization.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0


def _expand(scale: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    return scale.repeat_interleave(block, 0)[: shape[0]].repeat_interleave(block, 1)[:, : shape[1]]


def quantize_blockwise(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """W (out, in) -> (float8_e4m3fn values, fp32 scales (ceil(out/block), ceil(in/block)))."""
    out, inp = w.shape
    rows, cols = -(-out // block), -(-inp // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=w.device)
    padded[:out, :inp] = w.float()
    amax = padded.view(rows, block, cols, block).abs().amax(dim=(1, 3))
    scale = (amax / E4M3_MAX).clamp_min(1e-12)
    q = (w.float() / _expand(scale, w.shape, block)).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: int = 128,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(float8 values, block scales) -> W in `dtype`."""
    if q.dim() != 2 or scale.shape != (-(-q.shape[0] // block), -(-q.shape[1] // block)):
        raise ValueError(f"FP8 weight {tuple(q.shape)} needs block scales of shape "
                         f"({-(-q.shape[0] // block)}, {-(-q.shape[1] // block)}), got {tuple(scale.shape)}")
    return (q.float() * _expand(scale.float(), q.shape, block)).to(dtype)


def dequantize_checkpoint(tensors: dict[str, torch.Tensor], block: int = 128) -> dict[str, torch.Tensor]:
    """Replace every `X.weight` that has an `X.weight_scale_inv` by its dequantized fp32 weight."""
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        name = key[: -len("_scale_inv")]
        if name not in tensors:
            raise ValueError(f"{key} has no weight {name} to scale")
        out[name] = dequantize_blockwise(tensors[name], out.pop(key), block)
    return out
