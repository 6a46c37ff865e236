"""AdamW with V3's settings and the learning-rate schedules (paper section 4.2).

Weight decay applies to matrices only (every parameter with >= 2 dims: projections, stacked experts,
embedding, head); norms get none. The router bias is a buffer, outside the optimizer.
"""

from __future__ import annotations

import math

import torch

from nanoseek.train.config import OptimConfig


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def lr_at(step: int, total: int, cfg: OptimConfig) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total`."""
    peak, floor = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        start = cfg.warmup_steps
    else:
        start = max(cfg.warmup_steps, total - round(cfg.decay_frac * total))
    if step < start:
        return peak
    frac = min(1.0, (step - start) / max(1, total - 1 - start))
    if cfg.schedule == "wsd":
        return peak + (floor - peak) * frac
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * frac))
