"""nanoseek: the DeepSeek-V3 / R1 recipe in compact, verified PyTorch."""

from nanoseek.config import ModelConfig
from nanoseek.model import Transformer

__all__ = ["ModelConfig", "Transformer"]
__version__ = "0.1.0"
