import torch

from nanoseek import ModelConfig
from nanoseek.config import yarn_example
from nanoseek.model.mla import MLA, LatentCache, absorbed, kv_b_views
from nanoseek.model.rope import rope_table
from tests.conftest import tiny_model


def test_absorbed_equals_naive():
    cfg = ModelConfig.preset("tiny", rope_scaling=yarn_example(original=32))
    mla = MLA(cfg, 0)
    for p in mla.parameters():
        torch.nn.init.normal_(p, std=0.2)
    b, s, t = 2, 5, 12
    h, dn, dr, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    q_nope, q_pe = torch.randn(b, s, h, dn), torch.randn(b, s, h, dr)
    c_kv, k_pe = torch.randn(b, t, r), torch.randn(b, t, dr)
    mask = torch.rand(b, s, t) < 0.7
    mask[..., 0] = True
    naive = mla._naive(q_nope, q_pe, c_kv, k_pe, mask)
    w_uk, w_uv_t = kv_b_views(mla.kv_b_proj.weight, h, dn)
    o = absorbed(q_nope.flatten(0, 1), q_pe.flatten(0, 1), torch.cat([c_kv, k_pe], -1), ~mask, w_uk, w_uv_t, mla.scale)
    torch.testing.assert_close(o.view(b, s, h, -1), naive, atol=1e-5, rtol=1e-5)


def test_cache_holds_only_the_latent():
    cfg = ModelConfig.preset("small")
    cache = LatentCache(cfg.num_hidden_layers, 1, 8, cfg.cache_dim, torch.float32)
    assert cache.bytes_per_token() == cfg.cache_bytes_per_token(4) == 160 * 6 * 4


def _decode(model, ids, prefill, absorb_max):
    for layer in [*model.layers, *model.mtp]:
        layer.self_attn.absorb_max_query = absorb_max
    b, s = ids.shape
    cache = model.new_cache(b, s)
    pos = torch.arange(s)[None].expand(b, s)
    logits = [model(ids[:, :prefill], pos[:, :prefill], cache).logits]
    for i in range(prefill, s):
        logits.append(model(ids[:, i:i + 1], pos[:, i:i + 1], cache).logits)
    return torch.cat(logits, dim=1)


def test_cached_decoding_equals_full_forward():
    model = tiny_model(rope_scaling=yarn_example(original=16))
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        for prefill, absorb_max in [(1, 16), (20, 16), (20, 0), (7, 1)]:  # absorbed and expanded-cache paths
            torch.testing.assert_close(_decode(model, ids, prefill, absorb_max), full, atol=1e-4, rtol=1e-4)


def test_rows_of_different_lengths_decode_together():
    """Right-padded prompts with per-row positions give each row's own logits."""
    model = tiny_model()
    V = model.config.vocab_size
    a, b = torch.randint(0, V, (1, 12)), torch.randint(0, V, (1, 7))
    with torch.no_grad():
        ref_a, ref_b = model(a).logits, model(b).logits
        cache = model.new_cache(2, 16)
        prompt = torch.cat([a[:, :6], torch.cat([b[:, :3], torch.zeros(1, 3, dtype=torch.long)], 1)])
        out = model(prompt, torch.arange(6)[None].expand(2, 6), cache).logits
        torch.testing.assert_close(out[0], ref_a[0, :6], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[1, :3], ref_b[0, :3], atol=1e-4, rtol=1e-4)
        pos = torch.tensor([[6], [3]])
        for step in range(4):  # row b overwrites its padding slots as it goes
            ids = torch.stack([a[0, 6 + step], b[0, 3 + step]])[:, None]
            out = model(ids, pos + step, cache).logits
            torch.testing.assert_close(out[0, 0], ref_a[0, 6 + step], atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out[1, 0], ref_b[0, 3 + step], atol=1e-4, rtol=1e-4)


def test_positions_outside_cache_are_rejected():
    model = tiny_model()
    cache = model.new_cache(1, 4)
    try:
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor([[4]]), cache)
    except ValueError as e:
        assert "positions must lie in [0, 4)" in str(e)
    else:
        raise AssertionError("no error")


def test_begin_sets_the_step_once_per_positions():
    """The mask and `hidden` (None where every query sits at the last slot); the same positions tensor again (the
    MTP draft after its main forward) keeps the step's state, a new or modified one starts a new step."""
    cache = LatentCache(1, 2, 8, 4)
    pos = torch.tensor([[5, 6], [3, 4]])
    cache.begin(pos)
    assert cache.length == 7 and cache.hidden is not None
    assert cache.hidden[0, 0].tolist() == [False] * 6 + [True] and cache.hidden[1, 1].tolist() == [False] * 5 + [True] * 2
    mask = cache.mask
    cache.begin(pos)
    assert cache.mask is mask
    pos.add_(0)  # in place: another step
    cache.begin(pos)
    assert cache.mask is not mask
    cache.begin(torch.tensor([[6], [6]]))
    assert cache.hidden is None and cache.mask.all()
