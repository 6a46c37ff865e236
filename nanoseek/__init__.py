"""nanoseek: the DeepSeek-V3 / R1 recipe in compact, verified PyTorch."""

__all__ = ["ModelConfig", "Transformer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`from nanoseek import ModelConfig, Transformer` without loading torch on `import nanoseek` (PEP 562),
    so that the `nanoseek` command can set torch's environment before torch loads (cli/__init__.py)."""
    if name == "ModelConfig":
        from nanoseek.config import ModelConfig
        return ModelConfig
    if name == "Transformer":
        from nanoseek.model import Transformer
        return Transformer
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
