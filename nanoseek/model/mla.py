"""Multi-head Latent Attention (DeepSeek-V3 report §2.1.1; DeepSeek-V2 §2.1).

Shapes: b batch, s query length, t key length, h heads, d head dims, c latent (r_kv), r rope dim (d_r).

    c_Q  = RMSNorm(W_DQ x);  [q_nope, q_pe] = W_UQ c_Q          (or W_Q x without q-LoRA)
    [c_KV, k_pe] = W_DKV x;  [k_nope, v] = W_UKV RMSNorm(c_KV)   one RoPE key k_pe shared by all heads
    o = softmax(([q_nope, RoPE(q_pe)] . [k_nope, RoPE(k_pe)]) * scale) v;   out = W_O o

Two equal ways to compute it:
- naive (training, prefill): expand the latent to per-head K and V and attend (`attend`: causal SDPA; faster
  CPU kernels are applied from outside, nanoseek/kernels/attention.py).
- absorbed (decoding, `absorbed` below, also called by infer/fastpath/plan.py): fold W_UK into the query and W_UV after
  the weighted sum, so attention runs on the latent cache directly: MQA with one KV head of key dim c + r and
  value dim c. The cache holds
  kv_norm(c_KV) and RoPE'd k_pe: c + r numbers per token per layer, nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import apply_rope, softmax_scale


class LatentCache:
    """Preallocated MLA latent cache: per layer a (b, t_max, c + r) buffer (FlashMLA layout).

    Call `begin(positions)` once per forward with the positions (b, s) of the new tokens; each layer then
    writes its new latents at those positions and reads rows 0..max(positions). Rows may have different
    lengths: a query at position p attends to cache slots 0..p of its own row, so slots past a row's end
    (padding, rejected draft tokens) are never read before they are overwritten. `view(rows)` is the cache
    of a slice of the rows (sharing storage), so a batch can run on the rows in use without copies.
    """

    def __init__(self, n_layers: int, batch: int, max_len: int, dim: int, dtype=torch.float32, device=None,
                 layers: list[torch.Tensor] | None = None):
        self.max_len = max_len
        self.layers = layers if layers is not None else [
            torch.zeros(batch, max_len, dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.positions: torch.Tensor | None = None

    def view(self, rows: slice) -> LatentCache:
        """The cache of rows[start:stop], writing into this cache's buffers."""
        return LatentCache(0, 0, self.max_len, 0, layers=[buf[rows] for buf in self.layers])

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` slots to row dst (every layer)."""
        for buf in self.layers:
            buf[dst, :length] = buf[src, :length]

    def begin(self, positions: torch.Tensor) -> None:
        """positions (b, s) long. Sets the key length t and the mask (b, s, t): key slot <= query position
        (`hidden`: its negation, or None where every query sees every slot).
        `fresh`: every row holds positions 0..s-1, so attention is plain causal over the new tokens.
        The same positions again (the MTP draft after its main forward) keep all of this."""
        if positions is self.positions and positions._version == self._version:
            return
        lo, hi = positions.aminmax()
        lo, top = int(lo), int(hi) + 1
        if lo < 0 or top > self.max_len:
            raise ValueError(f"positions must lie in [0, {self.max_len}) (the cache length); got [{lo}, {top - 1}]")
        s = positions.shape[1]
        self.positions, self._version, self.length = positions, positions._version, top
        self.fresh = s == top and s > 1 and bool((positions == torch.arange(s, device=positions.device)).all())
        self.mask = torch.arange(top, device=positions.device) <= positions[:, :, None]
        self.hidden = None if lo == top - 1 else ~self.mask  # None: every query sits at the last slot
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        self._slots = (rows * self.max_len + positions).flatten()  # in the (b * max_len, c + r) view of a layer

    def update(self, layer: int, latent: torch.Tensor) -> torch.Tensor:
        """Write latent (b, s, c + r) or (b s, c + r) at this step's positions; return the cache (b, t, c + r)."""
        buf = self.layers[layer]
        buf.view(-1, buf.shape[-1]).index_copy_(0, self._slots, latent.reshape(-1, buf.shape[-1]).to(buf.dtype))
        return buf[:, : self.length]

    def bytes_per_token(self) -> int:
        return sum(buf.shape[-1] * buf.element_size() for buf in self.layers)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, absorb_max_query: int = 16):
        """absorb_max_query: up to this many new tokens per row, a cached step attends on the latent cache
        (absorbed: memory-bound decoding); more (a chunk of prompt) expand the latent first."""
        super().__init__()
        self.layer_idx = layer_idx
        self.absorb_max_query = absorb_max_query
        self.n_heads = cfg.num_attention_heads
        self.d_nope, self.d_rope, self.d_v = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        self.interleave = cfg.rope_interleave
        self.scale = softmax_scale(cfg)
        H, h, dqk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * dqk, bias=False)
        else:
            self.q_proj = nn.Linear(H, h * dqk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.cache_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, h * (self.d_nope + self.d_v), bias=False)
        self.o_proj = nn.Linear(h * self.d_v, H, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LatentCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: causal attention over the s tokens, or `mask` (b, s, s), True where a query may see
        a key (packed sequences)."""
        b, s, _ = x.shape
        h, dn, r = self.n_heads, self.d_nope, self.rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(b, s, h, dn + self.d_rope)  # (b, s, h, d)
        q_nope, q_pe = q.split([dn, self.d_rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin, self.interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([r, self.d_rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (b, s, c)
        k_pe = apply_rope(k_pe, cos, sin, self.interleave)  # (b, s, r)
        if cache is None:
            o = self._naive(q_nope, q_pe, c_kv, k_pe, mask=mask)
        else:
            latent = cache.update(self.layer_idx, torch.cat([c_kv, k_pe], dim=-1))  # (b, t, c + r)
            c_all, pe_all = latent.split([r, self.d_rope], dim=-1)
            if cache.fresh:  # prefill from position 0: causal SDPA over the new tokens (fused kernel)
                o = self._naive(q_nope, q_pe, c_kv, k_pe, mask=None)
            elif s <= self.absorb_max_query:
                o = absorbed(q_nope.flatten(0, 1), q_pe.flatten(0, 1), latent, cache.hidden,
                             *kv_b_views(self.kv_b_proj.weight, h, dn), self.scale)
            else:
                o = self._naive(q_nope, q_pe, c_all, pe_all, mask=cache.mask)
        return self.o_proj(o.reshape(b, s, h * self.d_v))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, mask):
        """Expand the latent into per-head K, V (b, t, h, d) and attend: causal (`attend`), or SDPA with `mask`
        (b, s, t)."""
        b, t, _ = c_kv.shape
        h, dn = self.n_heads, self.d_nope
        k_nope, v = self.kv_b_proj(c_kv).view(b, t, h, dn + self.d_v).split([dn, self.d_v], dim=-1)
        # (b, h, t, d), concatenated in that layout so that the kernels get contiguous heads without another copy
        k = torch.cat([k_nope.transpose(1, 2), k_pe[:, None].expand(b, h, t, self.d_rope)], dim=-1)
        q = torch.cat([q_nope.transpose(1, 2), q_pe.transpose(1, 2)], dim=-1)
        v = v.transpose(1, 2)
        if mask is None:
            o = self.attend(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=self.scale)
        return o.transpose(1, 2)  # (b, s, h, d_v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention, q, k (b, h, s, d_qk), v (b, h, s, d_v) -> o (b, h, s, d_v):
        o = softmax(q k^T * scale + M) v, M_ij = -inf where key j comes after query i."""
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)


def absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, hidden: torch.Tensor | None,
             w_uk: torch.Tensor, w_uv_t: torch.Tensor, scale: float) -> torch.Tensor:
    """q_nope (n, h, d_n), RoPE'd q_pe (n, h, r), latent (b, t, c + r) with n = b s, hidden (b, s, t): the key
    slots each query must not see (None: it sees all t), w_uk (h, d_n, c), w_uv_t (h, c, d_v) -> o (n, h, d_v).
    Batched matmuls, heads (then rows) as the batch."""
    n, h, _ = q_nope.shape
    b, t, c = latent.shape[0], latent.shape[1], w_uk.shape[-1]
    q_uk = torch.bmm(q_nope.transpose(0, 1), w_uk)  # (h, n, c)
    q_lat = torch.cat([q_uk.transpose(0, 1), q_pe], dim=-1).view(b, -1, latent.shape[-1])  # (b, s h, c + r)
    # (b, s h, t), the scale applied inside the GEMM (beta=0: the empty input is not read)
    scores = torch.baddbmm(latent.new_empty(()), q_lat, latent.transpose(1, 2), beta=0, alpha=scale)
    if hidden is not None:
        scores = scores.view(b, -1, h, t).masked_fill_(hidden[:, :, None, :], float("-inf"))
    p = scores.float().softmax(dim=-1).to(latent.dtype).view(b, -1, t)
    o_lat = torch.bmm(p, latent[..., :c]).view(n, h, c).transpose(0, 1)  # (h, n, c)
    return torch.bmm(o_lat, w_uv_t).transpose(0, 1)  # (n, h, d_v)


def kv_b_views(kv_b: torch.Tensor, h: int, d_nope: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kv_b_proj.weight (h (d_n + d_v), c) -> W_UK (h, d_n, c), W_UV^T (h, c, d_v): views, no copies."""
    w = kv_b.view(h, -1, kv_b.shape[1])
    return w[:, :d_nope], w[:, d_nope:].transpose(1, 2)
