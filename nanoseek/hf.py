"""Model directories for inference: a nanoseek run, one of its checkpoints, or a Hugging Face-format
directory (config.json with `model_type` + safetensors, single file or sharded with an index).

    run dir:        config.json (run config, "model" table) + tokenizer.json + checkpoints/latest -> step_N/
    checkpoint dir: model.safetensors + state.json (the run dir is two levels up)
    HF dir:         config.json (DeepseekV3Config fields) + model.safetensors[.index.json] [+ tokenizer.json]
                    FP8 weights in V3's format (e4m3 + `weight_scale_inv` per 128x128 block) are dequantized

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
from nanoseek.data.tokenizer import CHAT_TEMPLATE, Tokenizer
from nanoseek.model import Transformer
from nanoseek.model.fp8 import dequantize_checkpoint, quantize_checkpoint
from nanoseek.runs import latest_checkpoint


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
            pickles = sorted(p.name for p in directory.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
            hint = (f"; it holds {pickles}, pickle checkpoints, which nanoseek never loads (convert them to "
                    f"safetensors)" if pickles else "")
            raise ValueError(f"{directory} has no {name} (expected safetensors weights){hint}")
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


def load_pretrained(path: str | Path, device: str | torch.device | None = "cpu",
                    dtype: torch.dtype | str = torch.float32, needs_tokenizer: str | None = None) -> Pretrained:
    """Load a model (and its tokenizer, when the directory has one) ready for inference. device None: cuda
    when available, else cpu; dtype may be a name ("bfloat16"); needs_tokenizer names the use that
    requires a tokenizer.json (an error otherwise)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    run, weights, cfg = locate(path)
    quant = _read_json(run / "config.json").get("quantization_config") or {}
    block = quant.get("weight_block_size", [128, 128])
    if quant and (quant.get("quant_method") != "fp8" or block[0] != block[1]):
        raise ValueError(f"{run / 'config.json'}: quantization_config {quant} is not DeepSeek's blockwise FP8")
    try:
        tensors = dequantize_checkpoint(_weights(weights), block[0])  # FP8 weights (V3's format) -> fp32
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    if cfg.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{cfg.num_hidden_layers}.")
                                                for k in tensors):
        cfg = cfg.replace(num_nextn_predict_layers=0)  # saved by transformers, which has no MTP module
    model = Transformer(cfg)
    try:
        model.load_hf_state_dict(tensors)
    except ValueError as e:
        raise ValueError(f"{weights}: {e}") from None
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = Tokenizer.load(run) if (run / "tokenizer.json").is_file() else None
    if tokenizer is None and needs_tokenizer:
        raise ValueError(f"{path} has no tokenizer.json: {needs_tokenizer} needs one")
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{run / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}")
    return Pretrained(model, tokenizer, run.resolve().name, weights)


def export(path: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 << 30, fp8: bool = False,
           scale_fmt: str = "fp32") -> Path:
    """A run / checkpoint / HF directory -> a Hugging Face folder that `AutoModelForCausalLM` and
    `AutoTokenizer` load: config.json, generation_config.json, safetensors (sharded with an index past
    max_shard_bytes), tokenizer.json + tokenizer_config.json with the chat template. Router biases are
    shifted so their minimum is 0 (selection is unchanged: every expert moves by the same amount; older
    transformers releases assume non-negative biases). fp8: V3's FP8 format for the weights V3 quantizes
    (e4m3 `weight` + fp32 `weight_scale_inv` per 128x128 block, `quantization_config`; scale_fmt "ue8m0":
    power-of-two scales, marked as in V3.1's config)."""
    from safetensors.torch import save_file

    pre = load_pretrained(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = pre.model.config
    tensors = {}
    for key, t in pre.model.hf_state_dict().items():
        t = t.detach().contiguous().clone()  # MTP's embedding / head copies must not share storage
        if key.endswith("e_score_correction_bias"):
            t = t - t.min().clamp(max=0)
        tensors[key] = t
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    if fp8:
        tensors = quantize_checkpoint(tensors, 128, scale_fmt)
        if scale_fmt == "ue8m0":
            quant["scale_fmt"] = "ue8m0"
    shards, size = [[]], 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, out / name, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    hf_config = {**cfg.to_hf_dict(), "torch_dtype": "float32"} | ({"quantization_config": quant} if fp8 else {})
    (out / "config.json").write_text(json.dumps(hf_config, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}, indent=1))
    if pre.tokenizer is not None:
        pre.tokenizer.save(out)
        from nanoseek.data.tokenizer import BOS, EOS

        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
             "add_bos_token": False, "add_eos_token": False, "model_max_length": cfg.max_position_embeddings,
             "chat_template": CHAT_TEMPLATE}, indent=1))
    return out
