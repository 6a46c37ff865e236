"""The decoding plan: cached steps of a few new tokens per row, absorbed MLA on the latent cache, with as few ops
as the math needs.

A decode step at batch 1 streams every weight once (`small`: ~130 MB, ~5 ms on 2 cores) and runs a few hundred
small ops; through the modules those cost as much again (2-15 us per eager op on CPU, ~1-2 us per module call
or parameter lookup). `Plan` computes the same functions of the same parameters with fewer of them
(docs/LOG.md):
- it holds, per layer, the tensors a step reads, viewed once for the products (`gemv.blocked`), so a step
  makes no module calls and no weight views; rows stay 2-D (n = b s, H);
- products that read the same rows share one GEMV operand (q_a / kv_a; router, shared and routed experts);
- RoPE is one batched product with each row's rotation matrix (built once per step, `ops.rope_matrices`);
  RMSNorm is LayerNorm of [x, -x] (one kernel, `ops.rms_norm`);
- the new latents go to the cache with one index_copy_ (`LatentCache.update`);
- each of up to 4 tokens' routed experts run directly (no sort, scatter or count), each product written
  straight into one buffer; more tokens group by expert (`ops.experts_few`); router statistics are not kept;
  the MTP draft computes its layer's output only at the draft position (`keep`) and reuses its step's mask,
  plan and RoPE matrices (decoder.py).
The plan views the parameters' storage, so in-place updates (optimizer steps, load_state_dict) are seen;
`Plan.valid` notices replaced parameters or modules, moved weights and a new thread count.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.infer.fastpath.gemv import blocked, each_rows_t, mul_wt, rows_t
from nanoseek.infer.fastpath.ops import experts_few, rms_norm, rotate
from nanoseek.model.head import Head
from nanoseek.model.mla import absorbed, kv_b_views
from nanoseek.model.moe import MLP, Experts, Gate, MoE
from nanoseek.model.norm import RMSNorm


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
        # CPU, 2+ threads, every expert weight in row blocks: the products go straight to bmm
        self.blocks = blocks if all(w[1] is not None for w in self.gate_up + self.down) else 0
        # up to this many tokens, each token's experts run directly: no sort, scatter or count (the ids go to
        # Python: a sync on GPUs, which take the grouped GEMMs)
        self.direct_rows = 4 if m.experts.gate_up_proj.device.type == "cpu" else 0
        self.shared = None if m.shared_experts is None else _MLP(m.shared_experts, blocks)

    def __call__(self, x: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
        logits = mul_wt(xt, *self.router) if x.dtype == torch.float32 else F.linear(x.float(), self.router[0].float())
        weights, idx, _ = self.route(logits)
        y = None if self.shared is None else self.shared(x, xt)
        (n, H), k = x.shape, idx.shape[1]
        if n > self.direct_rows:
            routed = (experts_few([w for w, _ in self.gate_up], [w for w, _ in self.down], x, idx, weights)
                      if x.device.type == "cpu" else self.experts(x, idx, weights)[0])
            return routed if y is None else y.add_(routed)
        # each (token, expert) pair: two GEMVs into one buffer; SwiGLU over all pairs at once, then
        # y_i = shared_i + sum_j w_ij down_j: one batched product with the routing weights
        pairs = idx.tolist()
        gu, out = x.new_empty(n * k, 2 * self.I), x.new_empty(n * k, H)
        rows = [xt] if n == 1 else each_rows_t(x)
        experts = [e for ids in pairs for e in ids]
        if self.blocks:  # bmm straight into the buffers (mul_wt's checks and views cost ~15% of the layer)
            gu_o, out_o = (t.view(n * k, self.blocks, -1, 1).unbind(0) for t in (gu, out))
            product = lambda w, xt, o: torch.bmm(w[1], xt, out=o)  # noqa: E731
        else:
            gu_o, out_o, product = gu, out, lambda w, xt, o: mul_wt(xt, *w, out=o)
        for p, e in enumerate(experts):
            product(self.gate_up[e], rows[p // k], gu_o[p])
        a = F.silu(gu[:, :self.I]).mul_(gu[:, self.I:])
        for p, (a_p, e) in enumerate(zip(each_rows_t(a), experts)):
            product(self.down[e], a_p, out_o[p])
        weights = weights.to(x.dtype).view(n, 1, k)
        if y is None:
            return torch.bmm(weights, out.view(n, k, H)).view(n, H)
        return torch.baddbmm(y.view(n, 1, H), weights, out.view(n, k, H)).view(n, H)


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

    def attention(self, x: torch.Tensor, rot: torch.Tensor, cache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """x (n, H) normed -> MLA output (n, H), or at the rows `keep` only; writes every row's latent."""
        c, dn = self.c, self.dn
        xt = rows_t(x)
        kv = mul_wt(xt, *self.kv_a)
        k_pe = rotate(kv[:, None, c:], rot)[:, 0]
        latent = cache.update(self.layer, torch.cat([rms_norm(kv[:, :c], *self.kv_norm), k_pe], -1))
        hidden = cache.hidden
        if keep is not None:
            x, rot = x.index_select(0, keep), rot.index_select(0, keep)
            xt = rows_t(x)
            if hidden is not None:  # (b, s, t) -> the kept queries' rows (b, s_keep, t)
                hidden = hidden.flatten(0, 1).index_select(0, keep).view(hidden.shape[0], -1, hidden.shape[2])
        n = x.shape[0]
        if self.q_a is None:
            q = mul_wt(xt, *self.q_b)
        else:
            q = mul_wt(rows_t(rms_norm(mul_wt(xt, *self.q_a), *self.q_norm)), *self.q_b)
        q = q.view(n, self.h, dn + self.dr)
        o = absorbed(q[..., :dn], rotate(q[..., dn:], rot), latent, hidden, self.w_uk, self.w_uv_t, self.scale)
        return mul_wt(rows_t(o.reshape(n, -1)), *self.o)

    def __call__(self, h: torch.Tensor, rot: torch.Tensor, cache, keep: torch.Tensor | None = None) -> torch.Tensor:
        """One layer on rows h (n, H); with `keep`, its output at those rows only (the MTP draft's position)."""
        a = self.attention(rms_norm(h, *self.norm1), rot, cache, keep)
        h = (h if keep is None else h.index_select(0, keep)) + a
        x = rms_norm(h, *self.norm2)
        return h.add_(self.ffn(x, rows_t(x)))


_PLAIN = (nn.Linear, Head, RMSNorm, MLP, MoE, Gate, Experts)  # module types the plan reads (subclasses: FP8, expert
# parallel; a kernel's class, nanoseek/kernels, names the plain class it computes as `kernel_of`, and a module
# whose `kernel_of` is None, nanoseek/quant, holds no plain weights)


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
        self.usable = all(getattr(type(m), "kernel_of", type(m)) in _PLAIN for m in mods
                          if isinstance(m, (nn.Linear, *_PLAIN))) and \
            not any(hasattr(type(m), "kernel_of") and type(m).kernel_of is None for m in mods)
        if not self.usable:
            return
        blocks = self.threads if model.embed_tokens.weight.device.type == "cpu" else 1
        self.embed = model.embed_tokens.weight
        self.layers = [_Block(b, blocks) for b in model.layers]
        self.norm = _norm(model.norm)
        self.head = _w(model.lm_head.weight, blocks)
        self.mtp = [(_norm(m.enorm), _norm(m.hnorm), _w(m.eh_proj.weight, blocks), _Block(m, blocks),
                     _norm(m.shared_head["norm"])) for m in model.mtp]

    def valid(self) -> bool:
        """Still the same modules, parameters and storage, and the same number of threads."""
        return torch.get_num_threads() == self.threads and all(d.get(k) is v for d, k, v in self._slots) and \
            [p.data_ptr() for p in self._params] == self._ptrs and [type(m) for m in self._mods] == self._types

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, rot: torch.Tensor, cache) -> torch.Tensor:
        """input_ids (b, s) at the positions `cache.begin` was given -> final-normed hidden (b s, H)."""
        h = F.embedding(input_ids.reshape(-1), self.embed)
        for layer in self.layers:
            h = layer(h, rot, cache)
        return rms_norm(h, *self.norm)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden (n, H) -> logits (n, V)."""
        return mul_wt(rows_t(h), *self.head)

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, emb_next: torch.Tensor, rot: torch.Tensor, cache,
              keep: torch.Tensor | None = None) -> torch.Tensor:
        """MTP depth 1 on rows (n, H): the main model's final hidden and the next tokens' embeddings -> the
        normed hidden for the shared head, at the rows `keep` (n_keep,) only if given (all rows write their
        latents into the MTP layer's cache)."""
        enorm, hnorm, eh_proj, block, out_norm = self.mtp[0]
        x = torch.cat([rms_norm(emb_next, *enorm), rms_norm(hidden, *hnorm)], dim=-1)
        return rms_norm(block(mul_wt(rows_t(x), *eh_proj), rot, cache, keep), *out_norm)


_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> Plan (not copied with the model)


def plan_for(model: nn.Module) -> Plan | None:
    """The model's decoding plan, rebuilt when `Plan.valid` fails; None where the modules must decode."""
    plan = _PLANS.get(model)
    if plan is None or not plan.valid():
        plan = _PLANS[model] = Plan(model)
    return plan if plan.usable else None
