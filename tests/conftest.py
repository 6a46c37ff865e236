import pytest
import torch

from nanoseek import ModelConfig, Transformer


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model whose router biases are random and partly negative (as after bias updates)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            if hasattr(moe.gate, "e_score_correction_bias"):
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model
