"""One decoder layer (DeepSeek-V3 report §2.1): pre-norm MLA, then pre-norm dense SwiGLU or DeepSeekMoE.

    h = h + MLA(RMSNorm(h));   h = h + FFN(RMSNorm(h)),  FFN = MoE for layer_idx >= first_k_dense_replace
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.moe import MLP, MoE, RouterStats
from nanoseek.model.norm import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentCache | None = None,
                balance_loss: bool = True, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterStats | None]:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, cache, mask)
        x = self.post_attention_layernorm(h)
        if isinstance(self.mlp, MoE):
            y, stats = self.mlp(x, balance_loss)
            return h + y, stats
        return h + self.mlp(x), None
