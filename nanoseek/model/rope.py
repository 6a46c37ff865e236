"""Rotary position embedding on the decoupled d_r dims, with YaRN (DeepSeek-V3 report §2.1.1 for the decoupled key, §4.3 for YaRN).

    f_i = theta^(-2i/d_r),  i = 0 .. d_r/2 - 1
YaRN (only when `rope_scaling` is set, i.e. after context extension):
    cd(n)  = d_r ln(L_orig / (2 pi n)) / (2 ln theta)
    low    = max(floor(cd(beta_fast)), 0),  high = min(ceil(cd(beta_slow)), d_r - 1)
    ramp_i = clamp((i - low) / (high - low), 0, 1)
    f'_i   = f_i / s * ramp_i + f_i * (1 - ramp_i)
    m      = 0.1 * mscale_all_dim * ln(s) + 1      softmax scale = (d_n + d_r)^-1/2 * m^2
    cos/sin are multiplied by mscale(s, mscale) / mscale(s, mscale_all_dim) (1.0 for V3 and V2-Lite).

Layout: `rope_interleave=True` (DeepSeek's own) rotates consecutive pairs (x_2i, x_2i+1) as complex numbers
and keeps that layout; False rotates the pairs (x_j, x_j+d/2) ("rotate half").
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies f'_i, shape (d_r/2,), fp32."""
    d, theta = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    rs = cfg.rope_scaling
    if rs is None:
        return freqs
    factor, orig = rs["factor"], rs["original_max_position_embeddings"]

    def correction_dim(n_rot: float) -> float:
        return d * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(rs.get("beta_fast") or 32)), 0)
    high = min(math.ceil(correction_dim(rs.get("beta_slow") or 1)), d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    return freqs / factor * ramp + freqs * (1 - ramp)


def softmax_scale(cfg: ModelConfig) -> float:
    """(d_n + d_r)^-1/2, times m^2 under YaRN (m from mscale_all_dim, applied to nope and rope parts alike)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale


def cos_sin_factor(cfg: ModelConfig) -> float:
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    if rs.get("mscale") and rs.get("mscale_all_dim"):
        return yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
    return yarn_mscale(rs["factor"])


def rope_table(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for positions 0..length-1, each (length, d_r/2) fp32."""
    angles = torch.outer(torch.arange(length, dtype=torch.float32), rope_frequencies(cfg))
    a = cos_sin_factor(cfg)
    return angles.cos() * a, angles.sin() * a


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x (b, s, [h,] d_r) by cos/sin (b, s, d_r/2); computed in fp32, returned in x's dtype."""
    if x.dim() == 4:
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
