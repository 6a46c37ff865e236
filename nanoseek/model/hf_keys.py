"""Hugging Face names for the model's parameters (transformers' `DeepseekV3ForCausalLM` state-dict keys): the key and tensor mapping, with no I/O.

nanoseek's parameter names are DeepseekV3ForCausalLM's without the `model.` prefix, but for two things:
- routed experts are stacked, `experts.gate_up_proj` (e, 2I, H) (gate rows first) and `experts.down_proj`
  (e, H, I), where checkpoints hold one key set per expert (`experts.{j}.gate_proj.weight`, ...);
  transformers >= 5 stacks them as we do, and its keys load as they are;
- MTP depth k is `mtp.{k-1}.*`, where checkpoints put it at layer num_hidden_layers + k - 1 with copies of the
  embedding and the head (`embed_tokens`, `shared_head.head`), as the released V3 does.
"""

from __future__ import annotations

import re

import torch

from nanoseek.config import ModelConfig


def to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, mtp_copies: bool = True) -> dict[str, torch.Tensor]:
    """nanoseek's state dict -> DeepseekV3ForCausalLM's keys: one key set per routed expert (views of the
    stacked tensors), MTP at layer L + k - 1 with (if mtp_copies) its copies of the embedding and head."""
    L = cfg.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                out[name] = t
            continue
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        key = f"model.layers.{L + int(m[1])}.{m[2]}" if m else f"model.{name}"
        if key.endswith("experts.gate_up_proj"):
            stem, I = key[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{stem}{e}.gate_proj.weight"] = t[e, :I]
                out[f"{stem}{e}.up_proj.weight"] = t[e, I:]
        elif key.endswith("experts.down_proj"):
            stem = key[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{stem}{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    for k in range(cfg.num_nextn_predict_layers if mtp_copies else 0):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = state["embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = state["lm_head.weight"]
    return out


def from_hf(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], list[str]]:
    """DeepseekV3ForCausalLM's keys (per-expert or stacked) -> (nanoseek's names with the experts stacked, the
    keys that have no place in this configuration: MTP depths it lacks). The MTP copies are dropped."""
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mapped, experts, unexpected = {}, {}, []
    for key, t in sd.items():
        name = key[len("model."):] if key.startswith("model.") else key
        m = re.match(r"layers\.(\d+)\.(.*)", name)
        if m and int(m[1]) >= L:
            k, rest = int(m[1]) - L, m[2]
            if k >= D:
                unexpected.append(key)
                continue
            if rest in ("embed_tokens.weight", "shared_head.head.weight"):  # copies of the shared tensors
                continue
            name = f"mtp.{k}.{rest}"
        e = re.match(r"(.*experts\.)(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if e:
            experts.setdefault((e[1], e[3]), {})[int(e[2])] = t
        else:
            mapped[name] = t
    for (stem, kind), per_expert in experts.items():
        n = len(per_expert)
        if sorted(per_expert) != list(range(n)):
            raise ValueError(f"{stem}: expert indices {sorted(per_expert)[:8]}... are not 0..{n - 1}")
        stacked = torch.stack([per_expert[e] for e in range(n)])
        if kind == "down_proj":
            mapped[f"{stem}down_proj"] = stacked
        else:  # gate/up rows of one expert are concatenated, gate first
            mapped.setdefault(f"{stem}gate_up_proj", {})[kind] = stacked
    for key in [k for k, v in mapped.items() if isinstance(v, dict)]:
        parts = mapped.pop(key)
        if set(parts) != {"gate_proj", "up_proj"}:
            raise ValueError(f"{key}: experts need both gate_proj and up_proj, found {sorted(parts)}")
        mapped[key] = torch.cat([parts["gate_proj"], parts["up_proj"]], dim=1)
    if cfg.tie_word_embeddings:
        mapped.pop("lm_head.weight", None)
    return mapped, unexpected


def fit(mapped: dict[str, torch.Tensor], unexpected: list[str], ours: dict[str, torch.Size], cfg: ModelConfig,
        strict: bool = True) -> list[str]:
    """Check mapped tensors against the model's shapes (`ours`: name -> shape, the head left out when tied).
    Returns the missing names when strict=False; raises a ValueError listing missing, unexpected and mis-shaped
    keys otherwise (mis-shaped ones always)."""
    unexpected = unexpected + [k for k in mapped if k not in ours]
    missing = [k for k in ours if k not in mapped]
    wrong = [f"{k}: checkpoint {tuple(mapped[k].shape)} vs model {tuple(v)}"
             for k, v in ours.items() if k in mapped and mapped[k].shape != v]
    problems = [(f"missing keys ({len(missing)})", missing) if strict else None,
                (f"unexpected keys ({len(unexpected)})", unexpected) if strict else None,
                (f"wrong shapes ({len(wrong)})", wrong)]
    text = "; ".join(f"{title}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                     for title, items in filter(None, problems) if items)
    if text:
        raise ValueError(f"checkpoint does not fit this model ({cfg.summary()}): {text}")
    return missing
