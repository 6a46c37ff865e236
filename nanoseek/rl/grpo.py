"""GRPO (DeepSeekMath §4.1; R1 paper §2.2.1, eq. 1-3) with the variants of TRL, DAPO and Dr. GRPO: the
configuration and the loss math. The loop that samples, scores and updates is rl/loop.py.

For each prompt, G completions o_1..o_G are sampled from pi_old with rewards r_i (one per completion,
broadcast to its tokens):

    A_i       = (r_i - mean r) / (std r + 1e-4)      advantage="grpo"  (std with Bessel's correction, TRL)
              =  r_i - mean r                         advantage="dr_grpo" (Dr. GRPO: no std scaling)
    rho_i,t   = exp(logp_theta - logp_old)            per token
    l_i,t     = -min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) + beta k3_i,t
    k3_i,t    = exp(d) - d - 1,  d = logp_ref - logp_theta     (>= 0, 0 iff the policies agree)

    loss_agg="sequence":    (1/B) sum_i (1/|o_i|) sum_t l_i,t     GRPO (seq-mean-token-mean)
            ="token":       sum_i,t l_i,t / sum_i |o_i|            DAPO (token-level over the minibatch)
            ="micro_token": (1/K) sum_k [sum_(i,t in k) l_i,t / sum_(i in k) |o_i|]   TRL's BNPO: token-level
                            within each of the K micro-batches, averaged over them (depends on micro_batch)
            ="constant":    sum_i,t l_i,t / (B L_max)              Dr. GRPO (no length normalization)

B and |o_i| count a whole minibatch (the sequences of one optimizer step), so a loss summed over its
micro-batches is the formula above; TRL normalizes "grpo" and "dr_grpo" per micro-batch and divides by the
accumulation steps, which is the same when the micro-batches are equal (tests/rl/test_trl_parity.py).

Left out: the value of rho only differs from 1 when a rollout batch is used for more than one update
(mu > 1 or several minibatches); with mu = 1 and one minibatch the loss is on-policy REINFORCE with a group
baseline, its value is ~0 while its gradient is not (watch the reward, not the loss; TRL #2703). The KL
term is in the loss (not the reward) and needs a reference model only when beta > 0. Router biases are
frozen during RL (no load-balancing updates); the MTP module is not trained.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nanoseek.kernels import Settings as KernelSettings
from nanoseek.train.config import OptimConfig

ADVANTAGES = ("grpo", "dr_grpo")
AGGREGATIONS = ("sequence", "token", "micro_token", "constant")


@dataclass
class GRPOConfig:
    init: str = "runs/nano"  # the policy to start from: a run, checkpoint or HF directory
    out_dir: str = "runs/grpo"
    tasks: str = "add,sub"  # comma-separated task names (built-in families or .jsonl files), mixed uniformly
    difficulty: int | None = None  # only problems of this level (None: each task's default mix)
    template: str = ""  # for every task: chat, r1-zero, boxed or a string with {prompt} ("": each task's own)
    extractor: str = ""  # for every task: answer_tag, boxed or module:function ("": each task's own)
    steps: int = 40
    prompts_per_step: int = 16
    group_size: int = 8  # G
    max_completion_tokens: int = 64  # L_max
    max_prompt_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0
    advantage: str = "grpo"
    loss_agg: str = "sequence"  # TRL's loss_type: sequence = grpo, token = dapo, micro_token = bnpo, constant = dr_grpo
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # 0.28: DAPO's clip-higher
    beta: float = 0.0  # KL weight; 0 keeps no reference model
    ref_reset_every: int = 0  # copy the policy into the reference every N steps (R1: 400); 0 = never
    mu: int = 1  # policy updates per rollout batch
    minibatches: int = 1  # optimizer steps per update pass over the batch
    micro_batch: int = 64  # sequences per forward (gradient accumulation inside a minibatch)
    mask_truncated: bool = True  # completions cut at L_max get no loss (DAPO overlong filtering)
    pack_prompts: bool = True  # the update runs a group's prompt once where that costs fewer FLOPs (rl/packing.py)
    accuracy_weight: float = 1.0
    format_weight: float = 0.1
    reward_fns: str = ""  # extra rewards, comma-separated module:function, each fn(problem, text) -> float
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        lr=1e-4, warmup_steps=0, schedule="constant", weight_decay=0.0))
    seed: int = 0
    device: str = "auto"
    log_every: int = 1
    sample_every: int = 5  # write sample completions to samples.jsonl every N steps
    eval_every: int = 10
    eval_problems: int = 200
    eval_k: int = 4  # samples per problem for held-out pass@1 (temperature 0.6, top-p 0.95)
    ckpt_every: int = 10
    keep_last: int = 2
    price_per_hour: float = 2.0
    kernels: KernelSettings = field(default_factory=KernelSettings)  # nanoseek/kernels; config.json records gemm's

    def __post_init__(self):
        from nanoseek.data.tasks import check_template
        from nanoseek.data.tasks.answers import check_extractor

        if self.template:
            check_template(self.template)
        if self.extractor:
            check_extractor(self.extractor)
        choices = [("advantage", ADVANTAGES), ("loss_agg", AGGREGATIONS)]
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        positive = ("steps", "prompts_per_step", "group_size", "max_completion_tokens", "max_prompt_tokens", "mu",
                    "minibatches", "micro_batch", "log_every", "sample_every", "eval_every", "ckpt_every",
                    "keep_last")
        for name in positive:
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size} must be >= 2 (advantages compare completions of a group)")
        if self.prompts_per_step * self.group_size < self.minibatches:
            raise ValueError(f"minibatches={self.minibatches} exceeds the {self.prompts_per_step * self.group_size} "
                             f"completions of a step")
        for name in ("epsilon_low", "epsilon_high", "beta", "temperature", "ref_reset_every", "eval_problems",
                     "eval_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.temperature == 0:
            raise ValueError("temperature=0 gives G identical completions: GRPO needs sampling (e.g. 1.0)")

    @property
    def task_names(self) -> list[str]:
        names = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not names:
            raise ValueError(f"tasks={self.tasks!r} names no task")
        return names

    @property
    def task_options(self) -> dict[str, str]:
        """The template and extractor that override every task's own."""
        return {k: v for k, v in (("template", self.template), ("extractor", self.extractor)) if v}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def group_advantages(rewards: torch.Tensor, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G): minus the group mean, divided by the group std (n - 1) + eps
    when `scale` (GRPO); unscaled for Dr. GRPO. Zero-variance groups get 0."""
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True, unbiased=True) + eps)


def kl_k3(logp: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref): exp(d) - d - 1 with d = logp_ref - logp."""
    d = (logp_ref - logp).clamp(-20, 20)
    return d.exp() - d - 1


def policy_loss(logp: torch.Tensor, logp_old: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                cfg: GRPOConfig, norm: dict, logp_ref: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate (+ beta k3) on tokens (b, t) with mask (b, t), aggregated by cfg.loss_agg.

    `norm` holds the normalizers of the whole minibatch (`sequences`, `tokens`, `micro_batches`), so
    micro-batches summed give exactly the minibatch loss. Returns (loss, sums of per-token statistics over
    the masked tokens)."""
    ratio = (logp - logp_old).clamp(-20, 20).exp()
    a = adv[:, None]
    clipped = ratio.clamp(1 - cfg.epsilon_low, 1 + cfg.epsilon_high)
    per_token = -torch.minimum(ratio * a, clipped * a)
    stats = {"clip_low": ((ratio < 1 - cfg.epsilon_low) & (a < 0)).float(),
             "clip_high": ((ratio > 1 + cfg.epsilon_high) & (a > 0)).float()}
    if cfg.beta > 0:
        kl = kl_k3(logp, logp_ref)
        per_token = per_token + cfg.beta * kl
        stats["kl"] = kl.detach()
    loss = aggregate(per_token, mask, cfg.loss_agg, norm, cfg.max_completion_tokens)
    return loss, {k: (v * mask).sum() for k, v in stats.items()}


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, norm: dict, max_len: int) -> torch.Tensor:
    """Sum the masked per-token losses of a micro-batch with the minibatch's normalizer (see the docstring)."""
    mask = mask.to(per_token.dtype)
    if mode == "sequence":
        return ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).sum() / norm["sequences"]
    if mode == "token":
        return (per_token * mask).sum() / max(norm["tokens"], 1)
    if mode == "micro_token":
        return (per_token * mask).sum() / mask.sum().clamp_min(1) / norm["micro_batches"]
    return (per_token * mask).sum() / (norm["sequences"] * max_len)


def token_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, entropy: bool = False, packed=None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(ids[:, j+1] | ids[:, :j+1]) where mask (b, s - 1) is set, shape (b, s - 1), and optionally the
    entropy of those next-token distributions; 0 elsewhere. The head runs only on the columns from the first
    to the last masked one (the shared prompt prefix and the padding after the longest completion get none).
    `packed` (rl/packing.Packed of these ids): the forward runs on the groups' packed rows instead."""
    b, s = ids.shape
    cols = mask.any(dim=0).nonzero().flatten()
    lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
    if packed is None:
        index = torch.arange(lo, hi, device=ids.device).expand(b, -1)
        logits = model(ids, mtp=False, logits_at=index).logits.float()  # (b, hi - lo, V)
    else:
        logits = model.lm_head(packed.hidden(model, slice(lo, hi))).float()
    logp_all = logits.log_softmax(dim=-1)
    logp = logp_all.gather(-1, ids[:, lo + 1:hi + 1, None]).squeeze(-1)
    logp = F.pad(logp * mask[:, lo:hi], (lo, s - 1 - hi))
    ent = None
    if entropy:
        with torch.no_grad():
            ent = F.pad(-(logp_all.exp() * logp_all).sum(-1) * mask[:, lo:hi], (lo, s - 1 - hi))
    return logp, ent
