"""Weight-only int8 / int4 inference: `quantize(model, Spec(bits=4))` swaps, in place and from outside the
model, each linear layer and each layer's routed experts for a quantized module (modules.py; layouts.py has
the formats and the torch kernels they run on).

Quantized: every projection of MLA but W^UKV, the dense and shared SwiGLUs, each routed expert, MTP's eh_proj.
Kept in the model's dtype:
    embedding, RMSNorms       lookups and scales, no product
    router (gate.weight)      routing runs in fp32 (model/moe.py): a rounding there changes which experts run
    kv_b_proj (W^UK, W^UV)    absorbed decoding folds its blocks into the query and the output (model/mla.py);
                              it is 2 h (d_n + d_v) c parameters a layer, ~0.4% of V2-Lite's
    lm_head                   unless Spec(head=True): the largest single product at small sizes, and the logits'
                              precision is what sampling and log-probs read
hf.load_pretrained(..., quantize=spec) builds these modules empty and quantizes each weight as it streams from
the checkpoint, so a load never holds the whole model in high precision.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.model.moe import Experts
from nanoseek.quant.modules import BITS, QuantExperts, QuantLinear, Spec

KEEP = ("lm_head", "kv_b_proj")  # module names kept in high precision (above); lm_head unless Spec.head


def parse(name: str | None, group_size: int = 128, head: bool = False) -> Spec | str | None:
    """The --quantize flag: "int8" / "int4" -> Spec; None / "auto" -> None, the weights as stored (a GGUF file's
    blocks kept, gguf_io.read); "none" as it is: nothing quantized (a GGUF file's blocks dequantized)."""
    if name in (None, "auto"):
        return None
    if name == "none":
        return name
    allowed = {f"int{b}": b for b in BITS}
    if name not in allowed:
        raise ValueError(f"--quantize {name!r} must be one of {', '.join(allowed)}, auto or none")
    return Spec(allowed[name], group_size, head)


def targets(model: nn.Module, spec: Spec) -> dict[str, nn.Module]:
    """Qualified module name -> the module `quantize` replaces (a linear layer or routed experts)."""
    out = {}
    for name, m in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(m, Experts) or getattr(type(m), "kernel_of", None) is Experts:
            out[name] = m
        elif isinstance(m, nn.Linear) and (leaf not in KEEP or (leaf == "lm_head" and spec.head)):
            out[name] = m
    return out


def empty(m: nn.Module, spec: Spec, dtype: torch.dtype, name: str) -> QuantLinear | QuantExperts:
    """The quantized module for `m` (a plain one, possibly on the meta device), without its weights yet."""
    if isinstance(m, nn.Linear):
        return QuantLinear(m.in_features, m.out_features, spec, dtype, f"{name}.weight")
    E, I2, H = m.gate_up_proj.shape
    return QuantExperts(E, H, I2 // 2, spec, dtype, name)


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


@torch.no_grad()
def quantize(model: nn.Module, spec: Spec) -> nn.Module:
    """Swap, in place, every target (module docstring) of a built model for its quantized module; returns it."""
    dtype = lambda m: (m.weight if isinstance(m, nn.Linear) else m.gate_up_proj).dtype  # noqa: E731
    found = {name: (m, empty(m, spec, dtype(m), name)) for name, m in targets(model, spec).items()}
    for name, (m, new) in found.items():  # every shape was checked above: no half-quantized model on an error
        if isinstance(m, nn.Linear):
            new.set_weight(m.weight)
        else:
            new.set_weight("gate_up_proj", m.gate_up_proj)
            new.set_weight("down_proj", m.down_proj)
        replace(model, name, new)
    return model


def nbytes(model: nn.Module) -> int:
    """Bytes of the model's tensors: packed weights, scales and everything kept in high precision."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


__all__ = ["QuantExperts", "QuantLinear", "Spec", "nbytes", "parse", "quantize", "targets"]
