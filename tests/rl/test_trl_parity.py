"""Loss parity with TRL: one fixed batch through TRL's own GRPOTrainer code and through ours, for every loss
both have and both advantage scalings; the advantages, the loss and its gradient agree to 1e-6.

TRL's side is its real methods on a trainer holding only the state they read (`_Trainer`):
`_generate_and_score_completions` (advantages, the truncation mask, the token count) and `_compute_loss` per
micro-batch, with the per-token log-probs handed in (no model: both sides see the same numbers). Ours is
`pack` (the rollout's layout and mask), `group_advantages` and `policy_loss` with the loop's normalizers.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from nanoseek.rl.grpo import GRPOConfig, group_advantages, policy_loss
from nanoseek.rl.loop import pack

trl = pytest.importorskip("trl")
from trl.trainer.utils import split_tensor_dict  # noqa: E402

P, G, L, EOS, MICRO = 4, 4, 6, 1, 2  # prompts, group size, max completion tokens, eos = pad, micro-batches
LOSSES = {"grpo": "sequence", "dr_grpo": "constant", "dapo": "token", "bnpo": "micro_token"}  # TRL -> ours
SCALES = {"group": "grpo", "none": "dr_grpo"}  # TRL's scale_rewards -> our advantage


def fixed_batch():
    """P prompts x G completions of various lengths; completion 5 is cut at L (no EOS), group 0 has equal
    rewards; the old policy is far enough from the current one that clipping fires on both sides."""
    gen = torch.Generator().manual_seed(0)
    prompts = [[0, 2, *range(10, 12 + i), 3] for i in range(P)]  # lengths 5..8
    completions, rewards = [], torch.tensor([[1.0] * G, [1.1, 0.1, 0.1, 0.0], [0.0, 1.0, 0.1, 1.1],
                                             [0.1, 0.0, 0.0, 1.0]])
    for n in range(P * G):
        if n == 5:
            completions.append(torch.randint(6, 50, (L,), generator=gen).tolist())
        else:
            k = int(torch.randint(1, L, (1,), generator=gen))
            completions.append(torch.randint(6, 50, (k,), generator=gen).tolist() + [EOS])
    logp = -torch.rand(P * G, L, generator=gen) * 3  # (N, C), completion-aligned
    old = logp + torch.randn(P * G, L, generator=gen) * 0.4
    ref = logp + torch.randn(P * G, L, generator=gen) * 0.3
    return prompts, completions, rewards, logp, old, ref


class _Accelerator:
    device, num_processes, process_index, sync_gradients = torch.device("cpu"), 1, 0, True

    @staticmethod
    def gather(x, **_):
        return x

    reduce = gather_for_metrics = gather


def _policy(logps):
    return SimpleNamespace(logps=logps, training=True, is_gradient_checkpointing=False)


def trl_trainer(loss_type, scale, beta, off_policy, batch):
    prompts, completions, rewards, _, old, ref = batch

    class _Trainer(trl.GRPOTrainer):
        def __init__(self, **state):  # no model, no data: only what the two methods read
            self.__dict__.update(state)

        def _generate(self, texts):
            rows = [prompts[n // G] for n in range(len(texts))]
            return rows, completions, None, [str(c) for c in completions], None, {}, None, []

        def _calculate_rewards(self, inputs, texts, completion_texts, completion_ids):
            return rewards.reshape(-1, 1)

        def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, **_):
            return model.logps, torch.zeros_like(model.logps), None

    # off-policy: mu = 2 passes, so TRL computes old log-probs (generate_every = 2 * 2 does not divide 2)
    args = SimpleNamespace(per_device_train_batch_size=P * G // MICRO, steps_per_generation=MICRO,
                           gradient_accumulation_steps=MICRO, gradient_checkpointing_kwargs=None,
                           use_bias_correction_kl=False, delta=None)
    return _Trainer(
        args=args, accelerator=_Accelerator(), model=_policy(old), ref_model=_policy(ref), _tokenizer=SimpleNamespace(
            pad_token_id=EOS), eos_token_ids=[EOS], pad_to_multiple_of=None, mask_truncated_completions=True,
        environment_factories=None, environments=None, tools=None, _is_vlm=False, num_iterations=2 if off_policy
        else 1, use_vllm=False, vllm_importance_sampling_correction=False, beta=beta, num_generations=G,
        multi_objective_aggregation="sum_then_normalize", reward_weights=torch.ones(1), scale_rewards=scale,
        reward_func_names=["r"], _metrics={m: defaultdict(list) for m in ("train", "eval")},
        _logs={"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
               "extra": defaultdict(list)}, _pending_extra_logs={}, _pending_metrics={}, aux_loss_enabled=False,
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        loss_type=loss_type, epsilon_low=0.2, epsilon_high=0.28, current_gradient_accumulation_steps=MICRO,
        max_completion_length=L, _entropy_bonus_enabled=False)


@pytest.mark.parametrize("off_policy, beta", [(False, 0.0), (True, 0.04)], ids=["on-policy", "off-policy+kl"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("loss_type", LOSSES)
def test_loss_advantages_and_gradient_equal_trl(loss_type, scale, off_policy, beta):
    batch = fixed_batch()
    prompts, completions, rewards, logp, old, ref = batch
    N = P * G

    # TRL: score the batch, then one _compute_loss per micro-batch (gradient accumulation), gradients summed
    trainer = trl_trainer(loss_type, scale, beta, off_policy, batch)
    inputs = trainer._generate_and_score_completions([{"prompt": "q"} for _ in range(N)])
    theirs = logp.clone().requires_grad_()
    micro = N // MICRO
    trl_loss = sum(trainer._compute_loss(_policy(theirs[k * micro:(k + 1) * micro]), part)
                   for k, part in enumerate(split_tensor_dict(inputs, MICRO)))
    trl_loss.backward()

    # ours: the rollout layout (prompt + completion, position len(prompt) - 1 + j predicts completion token j)
    cfg = GRPOConfig(loss_agg=LOSSES[loss_type], advantage=SCALES[scale], beta=beta, epsilon_low=0.2,
                     epsilon_high=0.28, max_completion_tokens=L, micro_batch=micro)
    rows = [prompts[n // G] for n in range(N)]
    truncated = [len(c) == L and c[-1] != EOS for c in completions]
    ids, mask = pack(rows, completions, truncated, EOS, cfg.mask_truncated)
    adv = group_advantages(rewards, scale=cfg.advantage == "grpo").flatten()
    torch.testing.assert_close(adv, inputs["advantages"], atol=1e-6, rtol=0)
    assert truncated.count(True) == 1 and inputs["completion_mask"][truncated.index(True)].sum() == 0

    starts = [len(p) - 1 for p in rows]  # where each completion's targets begin in our layout

    def layout(x):  # completion-aligned (N, L) -> ours (N, S - 1)
        out = torch.zeros(mask.shape)
        for n, c in enumerate(completions):
            out[n, starts[n]: starts[n] + len(c)] = x[n, :len(c)]
        return out

    ours = layout(logp).requires_grad_()
    old_ours = layout(old) if off_policy else ours.detach()
    norm = {"sequences": N, "tokens": int(mask.sum()), "micro_batches": MICRO}
    our_loss = sum(policy_loss(ours[s], old_ours[s], adv[s], mask[s], cfg, norm, layout(ref)[s])[0]
                   for s in (slice(k * micro, (k + 1) * micro) for k in range(MICRO)))
    our_loss.backward()

    assert abs(float(our_loss.detach()) - float(trl_loss.detach())) < 1e-6, (our_loss, trl_loss)
    torch.testing.assert_close(ours.grad, layout(theirs.grad), atol=1e-6, rtol=0)  # and 0 off the completions
    assert ours.grad.abs().sum() > 0  # not trivially equal
    if off_policy:  # the case is meant to clip on both sides
        low, high = trainer._metrics["train"]["clip_ratio/low_mean"], trainer._metrics["train"]["clip_ratio/high_mean"]
        assert max(low) > 0 and max(high) > 0
