"""Model directories for inference: a nanoseek run, one of its checkpoints, or a Hugging Face-format
directory (config.json with `model_type` + safetensors, single file or sharded with an index).

    run dir:        config.json (run config, "model" table) + tokenizer.json + checkpoints/latest -> step_N/
    checkpoint dir: model.safetensors + state.json (the run dir is two levels up)
    HF dir:         config.json (DeepseekV3Config fields) + model.safetensors[.index.json] [+ tokenizer.json]

Only safetensors and JSON are read (never pickles).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from nanoseek.config import ModelConfig
from nanoseek.data.tokenizer import Tokenizer
from nanoseek.model import Transformer
from nanoseek.train.checkpoint import latest_checkpoint


@dataclass
class Pretrained:
    model: Transformer
    tokenizer: Tokenizer | None
    name: str  # what the server calls the model: the directory's name
    weights: Path  # the checkpoint directory the weights came from


def _read_json(file: Path) -> dict:
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not readable JSON: {e}") from None


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = sorted(set(_read_json(index)["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{directory} has no {name} (expected safetensors weights)")
        try:
            tensors.update(load_file(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file} is corrupt or truncated: {e}") from None
    return tensors


def locate(path: str | Path) -> tuple[Path, Path, ModelConfig]:
    """(directory with config.json and tokenizer.json, directory with the weights, model config)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory (expected a run, checkpoint or Hugging Face model directory)")
    if (path / "state.json").is_file() and not (path / "config.json").is_file():
        run, weights = path.parent.parent, path  # a checkpoint inside runs/NAME/checkpoints/
    else:
        run, weights = path, path
    if not (run / "config.json").is_file():
        raise ValueError(f"{run} has no config.json: not a nanoseek run or Hugging Face model directory")
    config = _read_json(run / "config.json")
    if "model" in config:  # a nanoseek run
        cfg = ModelConfig.from_hf_dict(config["model"])
        if weights is run:
            weights = latest_checkpoint(run)
            if weights is None:
                raise ValueError(f"{run} holds no checkpoint yet (checkpoints/latest is missing)")
    elif "model_type" in config:
        cfg = ModelConfig.from_hf_dict(config)
    else:
        raise ValueError(f"{run / 'config.json'} has neither a 'model' table (nanoseek run) nor 'model_type' "
                         f"(Hugging Face config)")
    return run, weights, cfg


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
                    ) -> Pretrained:
    """Load a model (and its tokenizer, when the directory has one) ready for inference."""
    run, weights, cfg = locate(path)
    model = Transformer(cfg)
    try:
        model.load_hf_state_dict(_weights(weights))
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.load(run) if (run / "tokenizer.json").is_file() else None
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{run / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}")
    return Pretrained(model, tokenizer, run.resolve().name, weights)
