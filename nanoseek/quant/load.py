"""Quantizing while loading (hf.load_pretrained(quantize=)): the meta model's targets become empty quantized
modules, and the loader hands each weight to its module as soon as it has read it (`Staged`)."""

from __future__ import annotations

import ctypes
import sys
from typing import Callable, NamedTuple

import torch
from torch import nn

from nanoseek.quant import Spec, empty, replace, targets


def release_freed() -> None:
    """Give glibc's freed heap pages back to the system (malloc_trim; a call, not a setting). A quantized load
    frees large high-precision temporaries between the small packed weights it keeps; glibc raises its mmap
    threshold after the first such free and then reuses, but never returns, that heap: the peak grew by
    1-2x the packed size without this."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
    _LIBC.malloc_trim  # noqa: B018 (glibc; musl has none)
except (OSError, AttributeError):
    _LIBC = None


class Staged(NamedTuple):
    """A weight a quantized load gathers before handing it over: its shape, and the function that takes it,
    whole (`take(None, w)`), or with `per_row` one row of dim 0 (one expert) at a time (`take(e, w[e])`)."""
    shape: torch.Size
    take: Callable
    per_row: bool


def shells(model: nn.Module, spec: Spec, only: Callable[[str], bool] = lambda name: True) -> dict[str, Staged]:
    """Swap the meta model's quantization targets (targets; those `only` accepts) for empty quantized modules;
    returns what hf._fill stages: state name -> the weight's shape and the quantized module's function that
    takes it."""
    staged = {}
    for name, m in targets(model, spec).items():
        if not only(name):
            continue
        dtype = (m.weight if isinstance(m, nn.Linear) else m.gate_up_proj).dtype
        shell = empty(m, spec, dtype, name)
        if isinstance(m, nn.Linear):
            staged[f"{name}.weight"] = Staged(m.weight.shape, lambda _, w, shell=shell: shell.set_weight(w), False)
        else:
            for which in ("gate_up_proj", "down_proj"):
                take = lambda e, w, shell=shell, which=which: shell.set_weight(which, w, e)  # noqa: E731
                staged[f"{name}.{which}"] = Staged(getattr(m, which).shape, take, True)
        replace(model, name, shell)
    return staged
