import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from nanoseek.rl.grpo import GRPOConfig, aggregate, group_advantages, kl_k3, policy_loss, token_logprobs
from tests.conftest import tiny_model


def test_group_advantages_match_hand_computed_values():
    r = torch.tensor([[1.0, 0, 0, 1], [1.1, 0.1, 0.1, 0.0], [1.0, 1, 1, 1]])
    grpo = group_advantages(r)
    torch.testing.assert_close(grpo[0], torch.tensor([0.86588, -0.86588, -0.86588, 0.86588]), atol=1e-5, rtol=0)
    torch.testing.assert_close(grpo[1], torch.tensor([1.49351, -0.43360, -0.43360, -0.62631]), atol=1e-5, rtol=0)
    assert (grpo[2] == 0).all()  # zero-variance group: no signal
    torch.testing.assert_close(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_k3_is_nonnegative_and_zero_when_policies_agree():
    logp = torch.zeros(3)
    torch.testing.assert_close(kl_k3(logp, torch.tensor([0.0, -0.5, 1.0])), torch.tensor([0.0, 0.10653, 0.71828]),
                               atol=1e-5, rtol=0)
    a, b = torch.randn(1000), torch.randn(1000)
    assert (kl_k3(a, b) >= 0).all() and (kl_k3(a, a) == 0).all()


@pytest.mark.parametrize("agg, value, weights", [
    ("sequence", 0.0, [0.25, 0.125]),  # (1/B) sum_i 1/|o_i|: short sequences weigh more
    ("token", 1 / 3, [1 / 6, 1 / 6]),  # 1 / total tokens
    ("micro_token", 1 / 3, [1 / 6, 1 / 6]),  # BNPO: 1 / tokens of the micro-batch (here the whole minibatch)
    ("constant", 1 / 4, [1 / 8, 1 / 8]),  # 1 / (B L_max)
])
def test_loss_aggregation_hand_check(agg, value, weights):
    """|o| = [2, 4], A = [+1, -1], rho = 1, beta = 0, L_max = 4 (worked by hand)."""
    cfg = GRPOConfig(loss_agg=agg, max_completion_tokens=4)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    logp = torch.zeros(2, 4, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, cfg, {"sequences": 2, "tokens": 6, "micro_batches": 1})
    assert float(loss.detach()) == pytest.approx(value, abs=1e-6)
    loss.backward()
    # d loss / d logp = -A * weight on each completion token, 0 on padding
    expected = torch.stack([-adv[i] * weights[i] * mask[i] for i in range(2)])
    torch.testing.assert_close(logp.grad, expected)


def test_clipping_stops_the_gradient_outside_the_trust_region():
    cfg = GRPOConfig(epsilon_low=0.2, epsilon_high=0.28)
    mask = torch.ones(4, 1, dtype=torch.bool)
    old = torch.zeros(4, 1)
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.1], [0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, 1.0])
    loss, stats = policy_loss(logp, old, adv, mask, cfg, {"sequences": 4, "tokens": 4})
    loss.backward()
    # rho 1.5 > 1.28 with A > 0 and rho 0.5 < 0.8 with A < 0: clipped, no gradient; the others pass
    assert logp.grad[0] == 0 and logp.grad[1] == 0 and logp.grad[2] != 0 and logp.grad[3] != 0
    assert float(stats["clip_high"]) == 1 and float(stats["clip_low"]) == 1


def test_micro_batches_sum_to_the_minibatch_loss():
    torch.manual_seed(0)
    mask = torch.rand(6, 5) > 0.3
    logp, old, adv = torch.randn(6, 5) * 0.1, torch.randn(6, 5) * 0.1, torch.randn(6)
    for agg in ("sequence", "token", "constant"):
        cfg = GRPOConfig(loss_agg=agg, max_completion_tokens=5, beta=0.1)
        norm = {"sequences": 6, "tokens": int(mask.sum())}
        whole = policy_loss(logp, old, adv, mask, cfg, norm, old)[0]
        parts = sum(policy_loss(logp[i:i + 2], old[i:i + 2], adv[i:i + 2], mask[i:i + 2], cfg, norm, old[i:i + 2])[0]
                    for i in range(0, 6, 2))
        torch.testing.assert_close(parts, whole)


def test_token_logprobs_and_entropy():
    """Equal to the full forward's where the mask is set (rows of different prompt lengths), 0 elsewhere."""
    model = tiny_model()
    ids = torch.tensor([[1, 5, 9, 2, 7, 3], [1, 4, 8, 6, 0, 0]])
    mask = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    logp, ent = token_logprobs(model, ids, mask, entropy=True)
    with torch.no_grad():
        full = model(ids).logits[:, :-1].log_softmax(-1)
    want = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(logp[mask], want[mask])
    torch.testing.assert_close(ent[mask], -(full.exp() * full).sum(-1)[mask])
    assert (logp[~mask] == 0).all() and (ent[~mask] == 0).all()
    logp.sum().backward()  # differentiable through the selected columns
    assert model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(advantage="ppo"), "advantage='ppo' must be one of"),
    (dict(group_size=1), "group_size=1 must be >= 2"),
    (dict(temperature=0), "GRPO needs sampling"),
    (dict(loss_agg="mean"), "loss_agg='mean' must be one of"),
])
def test_bad_configs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GRPOConfig(**kwargs)


DIGITS = '''
def letter_share(problem, text):
    """An easy reward to learn: the share of lowercase letters in the completion."""
    return sum("a" <= c <= "z" for c in text) / max(len(text), 1)
'''


@pytest.fixture
def rl_cfg(tiny_run, tmp_path, monkeypatch):
    from nanoseek.rl.loop import load_grpo_config

    (tmp_path / "easy_reward.py").write_text(DIGITS)
    monkeypatch.syspath_prepend(str(tmp_path))
    run, _ = tiny_run

    def make(*overrides):
        return load_grpo_config(None, [f"init={run}", f"out_dir={tmp_path / 'rl'}", "tasks=add", "steps=12",
                                       "prompts_per_step=4", "group_size=8", "max_completion_tokens=12",
                                       "reward_fns=easy_reward:letter_share", "accuracy_weight=0", "format_weight=0", "mask_truncated=false",
                                       "optim.lr=1e-2", "eval_problems=0", "ckpt_every=4", *overrides])
    return make


def records(cfg):
    return [json.loads(line) for line in open(f"{cfg.out_dir}/metrics.jsonl")]


def test_grpo_raises_an_easy_reward(rl_cfg):
    from nanoseek.rl.loop import run_grpo

    # 16 steps: over 20 runs (seeds 0-9, BLAS and oneDNN GEMMs, whose fp32 rounding alone sends sampling down
    # different paths) the rise was 0.14-0.35; at 12 steps one run rose only 0.04
    cfg = rl_cfg("steps=16")
    run_grpo(cfg, quiet=True)
    rewards = [r["reward"] for r in records(cfg)]
    assert len(rewards) == 16
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.05, rewards
    assert all(r["frac_zero_std"] < 1 and r["entropy"] > 0 for r in records(cfg))
    # generation and update seconds beside rollout tok/s: parts of the step
    assert all(0 < r["gen_time"] and 0 < r["update_time"] and r["gen_time"] + r["update_time"] <= r["step_time"] + 0.01
               for r in records(cfg))
    samples = [json.loads(line) for line in open(f"{cfg.out_dir}/samples.jsonl")]
    assert {s["step"] for s in samples} == {5, 10, 15, 16} and all("completion" in s for s in samples)


def test_grpo_resumes_exactly(rl_cfg):
    from nanoseek.rl.loop import run_grpo

    cfg = rl_cfg("steps=4", "ckpt_every=2", "beta=0.05", "mu=2", "minibatches=2", "eval_problems=0")
    run_grpo(cfg, quiet=True)
    straight = records(cfg)
    ckpts = f"{cfg.out_dir}/checkpoints"
    shutil.rmtree(f"{ckpts}/step_000004")
    open(f"{ckpts}/latest", "w").write("step_000002")
    with pytest.raises(ValueError, match="already holds a run"):
        run_grpo(cfg, quiet=True)
    run_grpo(cfg, resume=True, quiet=True)
    resumed = records(cfg)
    timing = ("step_time", "gen_time", "update_time", "elapsed", "mfu", "rollout_tok_s")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing}
                        for r in rs]
    assert strip(resumed) == strip(straight)
    assert all(r["kl"] > 0 for r in resumed)  # beta > 0: the policy moves away from the reference


def test_grpo_from_a_deepseek_folder_on_a_gsm8k_file(deepseek_r1_folder, tmp_path):
    """`rl init=FOLDER` on GSM8K's own file layout: R1's template opens <think> in the prompt, the boxed answer is
    read after </think>, GRPO steps run and the run keeps the folder's tokenizer."""
    from nanoseek.cli import main

    rows = [{"question": f"Sam has {i} pens and buys {i} more. How many pens?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
            for i in range(40)]
    (tmp_path / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rl"
    assert main(["rl", f"init={deepseek_r1_folder}", f"out_dir={out}", f"tasks={tmp_path / 'gsm8k.jsonl'}", "steps=2",
                 "prompts_per_step=2", "group_size=2", "max_completion_tokens=6", "max_prompt_tokens=128",
                 "eval_problems=0", "ckpt_every=2", "sample_every=1", "--quiet"]) == 0
    assert len(records(SimpleNamespace(out_dir=out))) == 2
    samples = [json.loads(line) for line in open(out / "samples.jsonl")]
    assert all(s["completion"].startswith("<think>\n") for s in samples)  # scored as the opener + completion
    from nanoseek.hf import load_pretrained

    assert load_pretrained(out).tokenizer.template.reasoning_opener == "<think>\n"
