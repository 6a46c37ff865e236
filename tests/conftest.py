import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.builtin import ensure_builtin_data


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


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """The built-in corpus, small: 1500 documents, a 512-token vocabulary."""
    return ensure_builtin_data(tmp_path_factory.mktemp("builtin"), vocab_size=512, n_train_docs=1500, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shard_dir):
    """A run directory of the tiny preset after 4 training steps: config.json, tokenizer.json, checkpoints.
    Returns (run_dir, the trained model)."""
    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import resolve_data, train

    out = tmp_path_factory.mktemp("tiny_run") / "tiny"
    cfg = load_train_config(None, ["preset=tiny", f"data.path={shard_dir}", f"out_dir={out}", "steps=4",
                                   "batch_size=2", "data.seq_len=64", "eval_every=4", "eval_batches=1", "ckpt_every=4"])
    cfg, shards, _ = resolve_data(cfg)
    result = train(cfg, shards, quiet=True)
    return out, result["model"].eval()
