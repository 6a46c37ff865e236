"""Faster kernels for a built model, applied from outside it: `apply(model, settings)` swaps the class of each
plain module it has a kernel for, as model.fp8_linear.to_fp8 does (same parameters, names and state dict),
and each kernel computes the function of the module it replaces (tests/kernels/):

    nn.Linear   -> gemm.Linear           the training products through oneDNN (where `gemm` is "onednn")
    MLA         -> attention.BlockedMLA  blocked causal attention for CPU training; SDPA's flash kernel else
    Head        -> head.FusedHead        the head's cross-entropy without the (tokens, V) logits
    Experts     -> experts.GroupedExperts  the routed experts' CPU training products as grouped GEMMs

Only modules of exactly the plain class are swapped (FP8 layers and expert-parallel experts keep theirs).
The choices are `Settings`, part of a run's config: "auto" for the GEMM library measures once (`resolve`),
and the run records the library it chose, so that a resumed run takes the same arithmetic.
`keep_freed_memory` is the allocator setting a training command applies at its start (memory.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from nanoseek.kernels import gemm
from nanoseek.kernels.attention import BlockedMLA
from nanoseek.kernels.experts import GroupedExperts
from nanoseek.kernels.head import FusedHead
from nanoseek.kernels.memory import keep_freed_memory
from nanoseek.model.head import Head
from nanoseek.model.mla import MLA
from nanoseek.model.moe import Experts

CHOICES = {"gemm": ("auto", *gemm.LIBRARIES), "attention": ("blocked", "sdpa"), "head": ("fused", "plain"),
           "experts": ("grouped", "plain")}


@dataclass
class Settings:
    """gemm: the library of the fp32 CPU training products ("auto": the faster one here, measured once);
    attention: "blocked" (attention.py) or "sdpa" (the reference's); head: "fused" (head.py) or "plain";
    experts: "grouped" (experts.py) or "plain"; keep_freed_memory: a training command sets glibc to keep freed
    memory at start-up (memory.py)."""

    gemm: str = "auto"
    attention: str = "blocked"
    head: str = "fused"
    experts: str = "grouped"
    keep_freed_memory: bool = True

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"kernels.{name}={getattr(self, name)!r} must be one of {', '.join(allowed)}")
        if not isinstance(self.keep_freed_memory, bool):
            raise ValueError(f"kernels.keep_freed_memory={self.keep_freed_memory!r} must be true or false")

    @classmethod
    def plain(cls) -> Settings:
        """No kernel: the reference model as it is."""
        return cls(gemm="blas", attention="sdpa", head="plain", experts="plain", keep_freed_memory=False)

    @classmethod
    def decoding(cls) -> Settings:
        """What the inference engine applies: the attention kernel (prefill through SDPA's CPU flash kernel)."""
        return dataclasses.replace(cls.plain(), attention="blocked")


def resolve(settings: Settings, recorded: dict | None = None) -> Settings:
    """`settings` with "auto" replaced by a library: the one `recorded` (a resumed run's config) names, else
    the one gemm.choose measures."""
    if settings.gemm != "auto":
        gemm.choose(settings.gemm)  # a clear error where this torch lacks the library
        return settings
    library = (recorded or {}).get("gemm")
    return dataclasses.replace(settings, gemm=library if library in gemm.LIBRARIES else gemm.choose("auto"))


def apply(model: nn.Module, settings: Settings) -> Settings:
    """Swap, in place, model's plain modules for the kernels `settings` names; returns the resolved settings
    (what the run records)."""
    settings = resolve(settings)
    onednn = settings.gemm == "onednn"
    for m in model.modules():
        kind = type(m)
        if kind is nn.Linear and onednn:
            m.__class__, m.onednn = gemm.Linear, True
        elif kind is MLA and settings.attention == "blocked":
            m.__class__ = BlockedMLA
        elif kind is Head and settings.head == "fused":
            m.__class__, m.onednn = FusedHead, onednn
        elif kind is Experts and settings.experts == "grouped":
            m.__class__, m.onednn = GroupedExperts, onednn
    return settings


def describe(settings: Settings) -> str:
    """One line for reports: "gemm blas, attention blocked, head fused, experts grouped"."""
    return ", ".join(f"{name} {getattr(settings, name)}" for name in CHOICES)


def start_process(settings: Settings) -> str | None:
    """What a training command does at start-up for `settings`: set the allocator where asked. Returns the line
    it prints, or None."""
    if settings.keep_freed_memory and keep_freed_memory():
        return ("kernels.keep_freed_memory: glibc keeps freed memory for reuse (M_MMAP_MAX=0, "
                "M_TRIM_THRESHOLD=2^31-1); set kernels.keep_freed_memory=false to leave it as it was")
    return None


__all__ = ["Settings", "apply", "describe", "resolve", "start_process"]
