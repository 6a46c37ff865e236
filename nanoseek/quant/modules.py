"""The quantized modules that replace nn.Linear and the routed experts (`quantize` swaps them in from outside
the model; layouts.py has the formats).

`QuantLinear` computes x W^T with the packed weight; `QuantExperts` computes what model.moe.Experts computes,
y = sum_k w_k FFN_{idx_k}(x), with each expert's packed weights, running only the experts that have tokens.
Both are built empty (`QuantLinear(in, out, spec, dtype)`) and take their weight through `set_weight`, so that
a load quantizes each tensor as it arrives (hf.load_pretrained). They hold no nn.Parameter: inference only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.quant.layouts import (INT4_GROUPS, INT4_ROWS, check_int4, dequantize_int8, int4_mm, int8_mm,
                                    pack_int4, quantize_int4, quantize_int8)

BITS = (8, 4)


@dataclass(frozen=True)
class Spec:
    """bits: 8 (int8, per output channel) or 4 (int4, in groups of `group_size` along the input: a weight whose
    input dimension it does not divide takes the largest smaller group that does, as V2-Lite's dense FFN, 10944
    = 64 x 171, needs); head: the output head too (kept in the model's dtype by default)."""

    bits: int = 4
    group_size: int = 128
    head: bool = False

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"quantize bits={self.bits!r} must be one of {BITS} (int8, int4)")
        if self.bits == 4:
            check_int4((16, self.group_size), self.group_size)

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4 (groups of {self.group_size})"

    def group(self, shape: tuple[int, ...], name: str = "weight") -> int:
        """The int4 group a (N, K) weight takes (module docstring); a clear error where none fits."""
        fits = [g for g in INT4_GROUPS if g <= self.group_size and shape[1] % g == 0]
        if not fits:
            raise ValueError(f"{name} {tuple(shape)}: no int4 group size of {INT4_GROUPS} up to {self.group_size} "
                             f"divides its input dimension {shape[1]}; use --quantize int8")
        return max(fits)

    def check(self, shape: tuple[int, ...], name: str) -> None:
        """A clear error where a weight of `shape` (N, K) has no layout under this spec."""
        if self.bits == 4:
            self.group(shape, name)

    def packed_bytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes of a (N, K) weight in this layout, scales (and zeros) in `dtype` included."""
        N, K = shape
        if self.bits == 8:
            return N * K + N * dtype.itemsize
        N += -N % INT4_ROWS
        return N * K // 2 + 2 * N * (K // self.group(shape)) * dtype.itemsize


def _register(owner: nn.Module, prefix: str, w: torch.Tensor | None, spec: Spec, dtype: torch.dtype,
              qsz: tuple[torch.Tensor, ...] | None = None) -> None:
    """One (N, K) weight in the spec's layout, as buffers `{prefix}q` and `{prefix}scales` of `owner`; or, for
    int4, its values already quantized: qsz = (q, s, z) as quantize_int4 returns them (a GGUF file's blocks)."""
    if spec.bits == 8:
        q, scales = quantize_int8(w, dtype)
    else:
        group = spec.group(tuple((w if qsz is None else qsz[0]).shape))
        q, s, z = qsz if qsz is not None else quantize_int4(w, group, dtype)
        if s.shape[1] * group != q.shape[1]:
            raise ValueError(f"int4 values in groups of {q.shape[1] // s.shape[1]}, not {group}")
        q, scales = pack_int4(q, s.to(dtype), z.to(dtype))
    owner.register_buffer(f"{prefix}q", q)
    owner.register_buffer(f"{prefix}scales", scales)


def _mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    return int8_mm(x, q, scales) if bits == 8 else int4_mm(x, q, scales, n)


def _dequantize(q: torch.Tensor, scales: torch.Tensor, bits: int, shape: tuple[int, int]) -> torch.Tensor:
    """The fp32 (N, K) weight the kernel multiplies."""
    if bits == 8:
        return dequantize_int8(q, scales)
    # the int4 layout is opaque: read it back through the kernel, a chunk of the identity at a time
    N, K = shape
    eye = torch.eye(K, dtype=scales.dtype)
    return torch.cat([int4_mm(eye[i:i + 1024], q, scales, N).T.float() for i in range(0, K, 1024)], dim=1)


class QuantLinear(nn.Module):
    """y = x W^T with W in int8 or int4 (`spec`), computed in `dtype` (the model's)."""

    kernel_of = None  # not a plain module: the decoding plan leaves the model to its modules

    def __init__(self, in_features: int, out_features: int, spec: Spec, dtype: torch.dtype, name: str = "weight"):
        super().__init__()
        spec.check((out_features, in_features), name)
        self.in_features, self.out_features, self.spec, self.dtype = in_features, out_features, spec, dtype

    def set_weight(self, w: torch.Tensor) -> None:
        _register(self, "", w, self.spec, self.dtype)

    def set_int4(self, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor) -> None:
        """The weight as int4 values already (q, s, z: layouts.quantize_int4's), packed as they are."""
        _register(self, "", None, self.spec, self.dtype, (q, s, z))

    def nbytes(self) -> int:
        return self.spec.packed_bytes((self.out_features, self.in_features), self.dtype)

    def dequantize(self) -> torch.Tensor:
        return _dequantize(self.q, self.scales, self.spec.bits, (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _mm(x.reshape(-1, self.in_features).to(self.dtype), self.q, self.scales, self.spec.bits, self.out_features)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.spec.name}"


class QuantExperts(nn.Module):
    """E routed SwiGLU experts, each with its own packed gate_up (2I, H) and down (H, I) weights."""

    kernel_of = None

    def __init__(self, n_experts: int, hidden: int, inter: int, spec: Spec, dtype: torch.dtype,
                 name: str = "experts"):
        super().__init__()
        spec.check((2 * inter, hidden), f"{name}.gate_up_proj")
        spec.check((hidden, inter), f"{name}.down_proj")
        self.n_experts, self.hidden, self.inter, self.spec, self.dtype = n_experts, hidden, inter, spec, dtype

    def set_weight(self, which: str, w: torch.Tensor, expert: int | None = None) -> None:
        """which: "gate_up_proj" (E, 2I, H) or "down_proj" (E, H, I), the stacked weights of Experts; or with
        `expert`, that expert's (2I, H) or (H, I) only."""
        for e in range(self.n_experts) if expert is None else (expert,):
            _register(self, f"{which}_{e}_", w[e] if expert is None else w, self.spec, self.dtype)

    def set_int4(self, which: str, q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, expert: int) -> None:
        """One expert's weight as int4 values already (QuantLinear.set_int4)."""
        _register(self, f"{which}_{expert}_", None, self.spec, self.dtype, (q, s, z))

    def nbytes(self) -> int:
        return self.n_experts * sum(self.spec.packed_bytes(self._shape(w), self.dtype)
                                    for w in ("gate_up_proj", "down_proj"))

    def dequantize(self, which: str) -> torch.Tensor:
        """The stacked fp32 weights the kernels multiply, as Experts holds them."""
        return torch.stack([_dequantize(getattr(self, f"{which}_{e}_q"), getattr(self, f"{which}_{e}_scales"),
                                        self.spec.bits, self._shape(which)) for e in range(self.n_experts)])

    def _shape(self, which: str) -> tuple[int, int]:
        return (2 * self.inter, self.hidden) if which == "gate_up_proj" else (self.hidden, self.inter)

    def _expert(self, which: str, e: int, x: torch.Tensor) -> torch.Tensor:
        return _mm(x, getattr(self, f"{which}_{e}_q"), getattr(self, f"{which}_{e}_scales"), self.spec.bits,
                   self._shape(which)[0])

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As Experts.forward: x (t, H), idx/weights (t, k) -> y (t, H), tokens per expert (e,)."""
        t, k = idx.shape
        flat = idx.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts)
        token = order // k
        xs = x.index_select(0, token).to(self.dtype)
        w = weights.flatten()[order, None]
        out, start = torch.empty_like(xs), 0
        for e, n in enumerate(counts.tolist()):
            if n:
                gate, up = self._expert("gate_up_proj", e, xs[start:start + n]).chunk(2, dim=-1)
                act = F.silu(gate) * up * w[start:start + n].to(self.dtype)
                out[start:start + n] = self._expert("down_proj", e, act)
                start += n
        return x.new_zeros(x.shape, dtype=self.dtype).index_add_(0, token, out), counts

    def extra_repr(self) -> str:
        return f"{self.n_experts} experts, hidden={self.hidden}, inter={self.inter}, {self.spec.name}"
