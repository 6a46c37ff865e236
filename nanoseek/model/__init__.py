"""The DeepSeek-V3 model: MLA, DeepSeekMoE, MTP. Imports only torch and nanoseek.config."""

from nanoseek.model.mla import MLA, LatentCache
from nanoseek.model.moe import MoE, Gate, Experts, MLP, RouterStats
from nanoseek.model.mtp import MTP, mtp_loss
from nanoseek.model.transformer import Transformer, ModelOutput

__all__ = ["MLA", "LatentCache", "MoE", "Gate", "Experts", "MLP", "RouterStats", "MTP", "mtp_loss",
           "Transformer", "ModelOutput"]
