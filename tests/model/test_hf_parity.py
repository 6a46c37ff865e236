"""Logits equal transformers' DeepseekV3ForCausalLM on the same weights (fp32, eager attention)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from nanoseek import ModelConfig, Transformer
from nanoseek.config import yarn_example

transformers = pytest.importorskip("transformers")


def hf_model(cfg: ModelConfig, seed: int = 0):
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF zero-inits some tensors; make every one random, biases partly negative
        for name, t in model.named_parameters():
            if "norm" in name:
                t.uniform_(0.5, 1.5)
            else:
                t.normal_(0, 0.05)
        for name, t in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("rope_scaling", [None, yarn_example(original=32, factor=4.0)], ids=["plain", "yarn"])
def test_logits_match_transformers(rope_scaling):
    cfg = ModelConfig.preset("tiny", rope_scaling=rope_scaling, num_nextn_predict_layers=0)
    ref = hf_model(cfg)
    biases = [b for n, b in ref.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and all((b < 0).any() for b in biases)
    ours = Transformer(cfg).eval()
    ours.load_hf_state_dict(ref.state_dict())
    ids = torch.randint(0, cfg.vocab_size, (2, 80))
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids).logits
    assert (got - want).abs().max() <= 1e-4
    # the test is sensitive: a wrong softmax scale (no m^2) or unbiased selection would break it
    assert want.std() > 0.05


def test_export_loads_in_transformers(tmp_path):
    """Our hf_state_dict (one key set per expert, MTP at layer L) + to_hf_dict load with from_pretrained."""
    cfg = ModelConfig.preset("tiny", rope_scaling=yarn_example(original=32, factor=4.0))
    ours = Transformer(cfg).eval()
    with torch.no_grad():
        for moe in ours.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    sd = {k: v.contiguous().clone() for k, v in ours.hf_state_dict().items()}
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    ref = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 70))
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max() <= 1e-4
    back = ModelConfig.from_hf_dict(ref.config.to_dict())
    assert back == cfg
