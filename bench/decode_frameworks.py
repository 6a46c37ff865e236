"""The two frameworks of bench/decode.py, one set of weights: the nanoseek engine and transformers'
DeepseekV3ForCausalLM (its defaults), and one timed generation with each (prefill and decode apart; method in
decode.py's docstring).
"""

from __future__ import annotations

import time

import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams


def small_config() -> ModelConfig:
    return ModelConfig.preset("small")  # num_nextn_predict_layers=1: the engine's cache has the MTP layer too


def build_ours(cfg: ModelConfig) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).eval()


def build_hf(cfg: ModelConfig, ours: Transformer | None):
    """DeepseekV3ForCausalLM with transformers' defaults (sdpa, grouped_mm experts) and our weights (None: its own
    random init, for the memory subprocess)."""
    import transformers

    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.DeepseekV3Config(**cfg.replace(num_nextn_predict_layers=0).to_hf_dict())
    model = transformers.DeepseekV3ForCausalLM._from_config(hf_cfg, attn_implementation="sdpa")
    if ours is not None:  # same convention as bench/train_throughput.py: stacked experts, a `model.` prefix
        sd = {k if k == "lm_head.weight" else f"model.{k}": v.clone()
              for k, v in ours.state_dict().items() if not k.startswith("mtp.")}
        model.load_state_dict(sd, strict=True)
    model.generation_config.pad_token_id = cfg.eos_token_id
    return model.eval()


def hf_experts_impl(model) -> str:
    return str(getattr(model.config, "_experts_implementation", None) or "default")


def run_ours(engine: Engine, prompts: torch.Tensor, n: int) -> dict:
    """Prefill + n decode steps on a reusable engine; prompts (b, P)."""
    b, P = prompts.shape
    rows = prompts.tolist()
    t0 = time.perf_counter()
    reqs = [engine.add(p, SamplingParams(max_tokens=n + 1)) for p in rows]
    engine.step()
    t1 = time.perf_counter()
    if len(engine.running) != b:
        raise RuntimeError(f"the prefill admitted {len(engine.running)} of {b} rows (raise prefill_tokens)")
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
    t2 = time.perf_counter()
    assert steps == n and all(len(r.tokens) == n + 1 for r in reqs), (steps, [len(r.tokens) for r in reqs])
    return dict(prefill_s=t1 - t0, decode_s=t2 - t1, tokens=[r.tokens for r in reqs])


class _Stamps:
    """A LogitsProcessor that only records when it is called (once per forward of generate)."""

    def __init__(self):
        self.t: list[float] = []

    def __call__(self, input_ids, scores):
        self.t.append(time.perf_counter())
        return scores


def run_hf(model, prompts: torch.Tensor, n: int, return_cache: bool = False) -> dict:
    import transformers

    stamps = _Stamps()
    mask = torch.ones_like(prompts)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(prompts, attention_mask=mask, max_new_tokens=n + 1, min_new_tokens=n + 1,
                             do_sample=False, logits_processor=transformers.LogitsProcessorList([stamps]),
                             return_dict_in_generate=True)
    assert len(stamps.t) == n + 1, len(stamps.t)
    res = dict(prefill_s=stamps.t[0] - t0, decode_s=stamps.t[-1] - stamps.t[0],
               tokens=out.sequences[:, prompts.shape[1]:].tolist())
    if return_cache:
        res["cache"] = out.past_key_values
    return res
