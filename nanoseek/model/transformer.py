"""The DeepSeek-V3 decoder (DeepSeek-V3 report §2.1) with its MTP modules, and Hugging Face parameter names.

    h = Embed(tokens);  h = Block_l(h) for l < L;  logits = lm_head(RMSNorm(h))     (head not tied by default)

Shapes: b batch, s sequence (new tokens), H hidden size, V vocabulary, k positions picked by `logits_at`,
L layers, D MTP depths.

`forward` serves training (no cache: SDPA causal attention, MTP logits, router statistics with the
balance loss) and inference (a `LatentCache`: per-row positions, absorbed attention for decoding). It is the
plain reference: the engine's decoding speed-ups are applied from outside it (nanoseek/infer/fastpath/).
Parameter names mirror transformers' `DeepseekV3ForCausalLM`; model/hf_keys.py maps the two differences
(stacked experts, MTP depth k at layer L + k - 1) for `hf_state_dict` / `load_hf_state_dict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model import hf_keys
from nanoseek.model.block import Block
from nanoseek.model.mla import LatentCache
from nanoseek.model.moe import Experts, Gate, MoE, RouterStats
from nanoseek.model.head import Head
from nanoseek.model.mtp import MTP, mtp_targets
from nanoseek.model.norm import RMSNorm
from nanoseek.model.rope import rope_table


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (b, s, V); None when labels were given (the loss is computed in chunks)
    hidden: torch.Tensor  # (b, s, H), after the final norm (what MTP depth 1 consumes)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (b, s - k, V), predicts t_{i+k+1}
    router: list[RouterStats] = field(default_factory=list)  # one per MoE layer, main then MTP (see moe_layers)
    loss: torch.Tensor | None = None  # next-token cross-entropy, when labels were given
    mtp_losses: list[torch.Tensor] = field(default_factory=list)  # depth k's cross-entropy, when labels were given


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Head(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        L = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTP(cfg, L + k) for k in range(cfg.num_nextn_predict_layers))
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None
        self.init_weights()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def init_weights(self) -> None:
        """N(0, initializer_range) for every matrix and the embedding; norms 1; router bias 0."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, Gate):
                nn.init.normal_(m.weight, std=std)
                if hasattr(m, "e_score_correction_bias"):
                    m.e_score_correction_bias.zero_()
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, std=std)
                nn.init.normal_(m.down_proj, std=std)

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in the order of `ModelOutput.router`: main layers, then MTP blocks."""
        return [b.mlp for b in [*self.layers, *self.mtp] if isinstance(b.mlp, MoE)]

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        """A latent cache for `batch` rows of up to `max_len` tokens (main layers, then MTP blocks)."""
        if max_len > self.config.max_position_embeddings:
            raise ValueError(f"max_len={max_len} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        p = self.embed_tokens.weight
        return LatentCache(len(self.layers) + len(self.mtp), batch, max_len, self.config.cache_dim,
                           dtype or p.dtype, p.device)

    def check_input_ids(self, input_ids: torch.Tensor) -> None:
        """A clear error for a batch that is not (b, s) or holds ids outside the vocabulary."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
        lo, hi = (int(v) for v in input_ids.aminmax())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}); got [{lo}, {hi}]")

    def rope_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (..., d_r / 2) at positions (...), from the fp32 table of every position (YaRN included)."""
        device = self.embed_tokens.weight.device
        if self._rope is None or self._rope[0].device != device:  # fp32 tables, never cast with the model
            cos, sin = rope_table(self.config, self.config.max_position_embeddings)
            self._rope = (cos.to(device), sin.to(device))
        return self._rope[0][positions], self._rope[1][positions]  # (b, s, d_r / 2)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, mtp: bool = True, labels: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (b, s). positions (b, s): defaults to 0..s-1 (and must be given with a cache).
        Without a cache: causal attention over the s tokens, MTP outputs (if `mtp`) and balance losses.
        labels (b, s) (labels[:, i] = t_{i+1}, -100 = ignore): return losses instead of logits (`Head.losses`). logits_at (b, k): only the logits at these
        indices along s, (b, k, V) (prefill needs the last prompt position only). attn_mask (b, s, s) bool,
        without a cache: True where query i may see key j, instead of causal (sequences packed into one row, each
        with its own `positions`); every query must see at least one key; no MTP."""
        cfg = self.config
        self.check_input_ids(input_ids)
        b, s = input_ids.shape
        if positions is None:
            if cache is not None:
                raise ValueError("positions are required with a cache")
            if s > cfg.max_position_embeddings:
                raise ValueError(f"sequence length {s} exceeds max_position_embeddings={cfg.max_position_embeddings}")
            positions = torch.arange(s, device=input_ids.device)[None]
        elif cache is not None:
            cache.begin(positions)
        elif positions.shape != input_ids.shape or int(positions.max()) >= cfg.max_position_embeddings:
            raise ValueError(f"positions must have shape {tuple(input_ids.shape)} and be < max_position_embeddings")
        if attn_mask is not None and (cache is not None or mtp or attn_mask.shape != (b, s, s)):
            raise ValueError(f"attn_mask must have shape {(b, s, s)} and comes without a cache and without MTP")
        if attn_mask is not None and not bool(attn_mask.any(dim=-1).all()):
            row, query = (int(i) for i in (~attn_mask.any(dim=-1)).nonzero()[0])
            raise ValueError(f"attn_mask: query {query} of row {row} sees no key (its attention would be NaN)")
        cos, sin = self.rope_cos_sin(positions)
        train = cache is None
        emb = self.embed_tokens(input_ids)
        h, router = emb, []
        for block in self.layers:
            h, stats = block(h, cos, sin, cache, balance_loss=train, mask=attn_mask)
            if stats is not None:
                router.append(stats)
        h = self.norm(h)
        out = ModelOutput(logits=None, hidden=h, router=router)
        if labels is None:
            out.logits = self.lm_head(h if logits_at is None else gather_positions(h, logits_at))
        heads = [(h, labels)]  # with labels: the main loss and MTP's, one node on the shared head weight
        if train and mtp:
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                n = s - k
                if n <= 0:
                    break
                h_prev, stats = module(h_prev[:, :n], emb[:, k:k + n], cos[:, :n], sin[:, :n])
                if labels is None:
                    out.mtp_logits.append(self.lm_head(h_prev))
                else:
                    heads.append((h_prev, mtp_targets(labels, k)))
                if stats is not None:
                    router.append(stats)
        if labels is not None:
            out.loss, *out.mtp_losses = self.lm_head.losses(heads)
        return out

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
              logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """MTP depth 1 on the latent cache, for speculative decoding: hidden (b, s, H) is the main model's
        output at `positions`, next_ids (b, s) the tokens at positions + 1; returns logits (b, s, V) (or
        (b, k, V) at logits_at (b, k)) for the tokens at positions + 2 (the draft)."""
        if not self.mtp:
            raise ValueError("this model has no MTP module (num_nextn_predict_layers=0) to draft with")
        cache.begin(positions)
        cos, sin = self.rope_cos_sin(positions)
        h, _ = self.mtp[0](hidden, self.embed_tokens(next_ids), cos, sin, cache, balance_loss=False)
        return self.lm_head(h if logits_at is None else gather_positions(h, logits_at))

    # ------------------------------------------------------------------ Hugging Face names (model/hf_keys.py)
    def hf_state_dict(self, mtp_copies: bool = True, state: dict[str, torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
        """State dict (`state`, default this model's) under DeepseekV3ForCausalLM names (hf_keys.to_hf)."""
        return hf_keys.to_hf(self.state_dict() if state is None else state, self.config, mtp_copies)

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> list[str]:
        """Load DeepseekV3ForCausalLM names, per-expert or stacked (hf_keys.from_hf). Returns the missing keys
        (ours) when strict=False; raises a ValueError listing missing, unexpected and mis-shaped keys otherwise."""
        mapped, unexpected = hf_keys.from_hf(sd, self.config)
        ours = {k: v for k, v in self.state_dict().items()
                if not (self.config.tie_word_embeddings and k == "lm_head.weight")}
        missing = hf_keys.fit(mapped, unexpected, {k: v.shape for k, v in ours.items()}, self.config, strict)
        for k, v in ours.items():
            if k in mapped:
                v.copy_(mapped[k])
        return missing


def gather_positions(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """h (b, s, H), index (b, k) along s -> (b, k, H)."""
    return h.gather(1, index[:, :, None].expand(-1, -1, h.shape[-1]))
