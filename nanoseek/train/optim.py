"""AdamW with V3's settings and the learning-rate schedules (DeepSeek-V3 report §4.2).

Weight decay applies to matrices only (every parameter with >= 2 dims: projections, stacked experts,
embedding, head); norms get none. The router bias is a buffer, outside the optimizer.
optim.moments_dtype="bf16": `LowPrecisionAdamW` keeps m and v in bf16 (DeepSeek-V3 report §3.3.3), fp32 master weights.
"""

from __future__ import annotations

import math

import torch

from nanoseek.train.config import OptimConfig


class LowPrecisionAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update with the moments stored in `moments_dtype` (rounded to nearest):

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2          (computed in fp32)
        p = p (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float = 0.0,
                 moments_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.moments_dtype = moments_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            (b1, b2), lr = group["betas"], group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in ("exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, dtype=self.moments_dtype)
                for key in ("exp_avg", "exp_avg_sq"):  # load_state_dict casts state to the parameter's dtype
                    state[key] = state[key].to(self.moments_dtype)
                state["step"] += 1
                t = float(state["step"])
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - b1)
                v = state["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                p.mul_(1 - lr * group["weight_decay"])
                p.addcdiv_(m, (v.sqrt() / math.sqrt(1 - b2 ** t)).add_(group["eps"]), value=-lr / (1 - b1 ** t))
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.moments_dtype == "bf16":
        return LowPrecisionAdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                 moments_dtype=torch.bfloat16)
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
