"""Cached steps of a few new tokens per row: absorbed MLA on the latent cache with as few ops as the math needs.

A decode step at batch 1 streams every weight once (`small`: ~130 MB, ~5 ms on 2 cores) and runs a few hundred
small ops; through the modules those cost as much again (2-15 us per eager op on CPU, ~1-2 us per module call
or parameter lookup). `Plan` computes the same functions of the same parameters with fewer of them
(docs/LOG.md, session 4):
- it holds, per layer, the tensors a step reads, viewed once for the products (`linear.blocked`), so a step
  makes no module calls and no weight views; rows stay 2-D (n = b s, H);
- products that read the same rows share one GEMV operand (q_a / kv_a; router, shared and routed experts);
- RoPE on DeepSeek's interleaved pairs is one complex product with cos + i sin (looked up once per step);
- the new latents go to the cache with one index_copy_ (`LatentCache.update`);
- each of up to 4 tokens' routed experts run directly (no sort, scatter or count); router statistics are
  not kept; the MTP draft computes its layer's output only at the draft position (`keep`).
The plan views the parameters' storage, so in-place updates (optimizer steps, load_state_dict) are seen;
`Plan.valid` notices replaced parameters or modules, moved weights and a new thread count.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.model.linear import Linear, blocked, mul_wt, rows_t
from nanoseek.model.mla import absorbed, kv_b_views
from nanoseek.model.moe import MLP, Experts, Gate, MoE
from nanoseek.model.norm import RMSNorm, rms_norm
from nanoseek.model.rope import apply_rope


class Rope(NamedTuple):
    """RoPE factors of the n new tokens: cos, sin (n, d_r/2); cis = cos + i sin for the interleaved layout."""

    cos: torch.Tensor
    sin: torch.Tensor
    cis: torch.Tensor | None


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """RoPE of x (n, [h,] d_r) in fp32, returned in x's dtype (= apply_rope)."""
    xf = x.float()
    if rope.cis is None:
        return apply_rope(xf[None], rope.cos[None], rope.sin[None], interleave=False)[0].to(x.dtype)
    if xf.stride(-1) != 1 or xf.storage_offset() % 2 or any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()  # complex views need pairs that are adjacent and aligned
    cis = rope.cis if x.dim() == 2 else rope.cis[:, None]
    pairs = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (x_2i, x_2i+1) as x_2i + i x_2i+1
    return torch.view_as_real(pairs * cis).flatten(-2).to(x.dtype)


# ---------------------------------------------------------------------------------------------- the plan
def _w(w: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    return w, blocked(w, blocks)


def _norm(m: RMSNorm) -> tuple[torch.Tensor, float]:
    return m.weight, m.eps


class _MLP:
    def __init__(self, m: MLP, blocks: int):
        self.gate, self.up, self.down = (_w(l.weight, blocks) for l in (m.gate_proj, m.up_proj, m.down_proj))

    def __call__(self, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        a = F.silu(mul_wt(xt, *self.gate)).mul_(mul_wt(xt, *self.up))
        return mul_wt(rows_t(a), *self.down)


class _MoE:
    def __init__(self, m: MoE, blocks: int):
        self.router, self.route = _w(m.gate.weight, blocks), m.gate.route
        self.experts = m.experts
        E, I2, H = m.experts.gate_up_proj.shape
        gu, down = m.experts.gate_up_proj, m.experts.down_proj
        self.gate_up = [_w(gu[e], blocks) for e in range(E)]
        self.down = [_w(down[e], blocks) for e in range(E)]
        self.I = I2 // 2
        # up to this many tokens, each token's experts run directly: no sort, scatter or count (the ids go to
        # Python: a sync on GPUs, which take the grouped GEMMs)
        self.direct_rows = 4 if m.experts.gate_up_proj.device.type == "cpu" else 0
        self.shared = None if m.shared_experts is None else _MLP(m.shared_experts, blocks)

    def __call__(self, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        logits = mul_wt(xt, *self.router) if x.dtype == torch.float32 else F.linear(x.float(), self.router[0].float())
        weights, idx, _ = self.route(logits)
        y = None if self.shared is None else self.shared(x, xt)
        n = x.shape[0]
        if n > self.direct_rows:
            routed = self.experts(x, idx, weights)[0]
            return routed if y is None else y.add_(routed)
        y = torch.zeros_like(x) if y is None else y
        for i, (ids, ws) in enumerate(zip(idx.tolist(), weights.tolist())):  # each token's k experts directly
            xi, yi = (x, y) if n == 1 else (x[i:i + 1], y[i:i + 1])
            xit = xt if n == 1 else rows_t(xi)
            for e, w in zip(ids, ws):
                gu = mul_wt(xit, *self.gate_up[e])
                a = F.silu(gu[:, :self.I]).mul_(gu[:, self.I:])
                yi.add_(mul_wt(rows_t(a), *self.down[e]), alpha=w)
        return y


class _Block:
    def __init__(self, blk, blocks: int):
        a = blk.self_attn
        self.layer, self.h, self.dn, self.dr, self.scale = a.layer_idx, a.n_heads, a.d_nope, a.d_rope, a.scale
        self.c = a.rank
        self.norm1, self.norm2 = _norm(blk.input_layernorm), _norm(blk.post_attention_layernorm)
        if hasattr(a, "q_proj"):
            self.q_a, self.q_norm, self.q_b = None, None, _w(a.q_proj.weight, blocks)
        else:
            self.q_a, self.q_norm = _w(a.q_a_proj.weight, blocks), _norm(a.q_a_layernorm)
            self.q_b = _w(a.q_b_proj.weight, blocks)
        self.kv_a, self.kv_norm = _w(a.kv_a_proj_with_mqa.weight, blocks), _norm(a.kv_a_layernorm)
        self.w_uk, self.w_uv_t = kv_b_views(a.kv_b_proj.weight, a.n_heads, a.d_nope)
        self.o = _w(a.o_proj.weight, blocks)
        self.ffn = _MoE(blk.mlp, blocks) if isinstance(blk.mlp, MoE) else _MLP(blk.mlp, blocks)

    def attention(self, x: torch.Tensor, rope: Rope, cache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, H) normed -> MLA output (n, H), or at the rows `keep` only; writes every row's latent."""
        c, dn = self.c, self.dn
        xt = rows_t(x)
        kv = mul_wt(xt, *self.kv_a)
        latent = cache.update(self.layer, torch.cat([rms_norm(kv[:, :c], *self.kv_norm), rotate(kv[:, c:], rope)], -1))
        mask = cache.decode_mask
        if keep is not None:
            x, rope = x.index_select(0, keep), Rope(*(f if f is None else f.index_select(0, keep) for f in rope))
            xt = rows_t(x)
            if mask is not None:  # (b, s, t) -> the kept queries' rows (b, s_keep, t)
                mask = mask.flatten(0, 1).index_select(0, keep).view(mask.shape[0], -1, mask.shape[2])
        n = x.shape[0]
        if self.q_a is None:
            q = mul_wt(xt, *self.q_b)
        else:
            q = mul_wt(rows_t(rms_norm(mul_wt(xt, *self.q_a), *self.q_norm)), *self.q_b)
        q = q.view(n, self.h, dn + self.dr)
        o = absorbed(q[..., :dn], rotate(q[..., dn:], rope), latent, mask, self.w_uk, self.w_uv_t, self.scale)
        return mul_wt(rows_t(o.reshape(n, -1)), *self.o)

    def __call__(self, h: torch.Tensor, rope: Rope, cache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """One layer on rows h (n, H); with `keep`, its output at those rows only (the MTP draft's position)."""
        a = self.attention(rms_norm(h, *self.norm1), rope, cache, keep)
        h = (h if keep is None else h.index_select(0, keep)) + a
        x = rms_norm(h, *self.norm2)
        return h.add_(self.ffn(x, rows_t(x)))


_PLAIN = (Linear, RMSNorm, MLP, MoE, Gate, Experts)  # module types the plan reads (subclasses: FP8, expert parallel)


class Plan:
    """A Transformer's decoding plan (see the module docstring). Use `plan_for(model)`: it is None where a layer
    is not one of the plain module types (FP8 layers, expert parallelism), which decode through the modules."""

    def __init__(self, model: nn.Module):
        mods = list(model.modules())
        self._slots = [(d, k, d[k]) for m in mods for d in (m._modules, m._parameters) for k in d]
        self._params = [v for _, _, v in self._slots if isinstance(v, torch.Tensor)]
        self._ptrs = [p.data_ptr() for p in self._params]
        self._mods, self._types = mods, [type(m) for m in mods]
        self.threads = torch.get_num_threads()
        self.usable = all(type(m) in _PLAIN for m in mods if isinstance(m, (nn.Linear, *_PLAIN)))
        if not self.usable:
            return
        blocks = self.threads if model.embed_tokens.weight.device.type == "cpu" else 1
        self.embed = model.embed_tokens.weight
        self.layers = [_Block(b, blocks) for b in model.layers]
        self.norm = _norm(model.norm)
        self.mtp = [(_norm(m.enorm), _norm(m.hnorm), _w(m.eh_proj.weight, blocks), _Block(m, blocks),
                     _norm(m.shared_head["norm"])) for m in model.mtp]

    def valid(self) -> bool:
        """Still the same modules, parameters and storage, and the same number of threads."""
        return torch.get_num_threads() == self.threads and all(d.get(k) is v for d, k, v in self._slots) and \
            [p.data_ptr() for p in self._params] == self._ptrs and [type(m) for m in self._mods] == self._types

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, rope: Rope, cache) -> torch.Tensor:
        """input_ids (b, s) at the positions `cache.begin` was given -> final-normed hidden (b s, H)."""
        h = F.embedding(input_ids.reshape(-1), self.embed)
        for layer in self.layers:
            h = layer(h, rope, cache)
        return rms_norm(h, *self.norm)

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, emb_next: torch.Tensor, rope: Rope, cache,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """MTP depth 1 on rows (n, H): the main model's final hidden and the next tokens' embeddings -> the
        normed hidden for the shared head, at the rows `keep` (n_keep,) only if given (all rows write their
        latents into the MTP layer's cache)."""
        enorm, hnorm, eh_proj, block, out_norm = self.mtp[0]
        x = torch.cat([rms_norm(emb_next, *enorm), rms_norm(hidden, *hnorm)], dim=-1)
        return rms_norm(block(mul_wt(rows_t(x), *eh_proj), rope, cache, keep), *out_norm)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Plan (not copied with the model)


def plan_for(model: nn.Module) -> Plan | None:
    """The model's decoding plan, rebuilt when `Plan.valid` fails; None where the modules must decode."""
    plan = _PLANS.get(model)
    if plan is None or not plan.valid():
        plan = _PLANS[model] = Plan(model)
    return plan if plan.usable else None
