"""Memory per GPU of a training job at data-parallel degree D (GPUs, each with its own data) and
expert-parallel degree P (`nanoseek plan`), for the layout of nanoseek/parallel/parallelize.py:

    every weight is sharded over all D GPUs: dense ones by FSDP over D, the routed experts E/P per GPU
    and FSDP over the D/P GPUs that hold the same experts, so the persistent state per GPU is N/D:
        weights (fp32 master) 4 N / D  +  gradients (fp32) 4 N / D  +  AdamW m, v (fp32) 8 N / D
    transient, while a block runs: its weights gathered in bf16, 2 (R + 2 B_max), with R the root's
    (embedding, head, final norm: gathered for the whole step) and B_max the largest block as one GPU
    gathers it (attention, norms, router, shared experts and only E/P routed experts: where P helps),
    this block and the prefetched next one; its unsharded fp32 gradients before the reduce-scatter 4 B_max
    activations (bf16, no recomputation): b S tokens x sum over layers of what autograd keeps per token,
        MLA   2H + 2 r_q + 2 r_kv + d_r + n_h (2 d_qk + 2 d_v)
        FFN   2H + 3 I (dense)  |  2H + K (H + 3 I_m) + 3 N_s I_m, plus E fp32 router scores (MoE)
        MTP   one more block each, plus its 2H-wide projection input; embedding and final norm 2H
N counts the main model and the MTP modules (all are trained). The activation figure is an estimate of
the tensors autograd keeps (measure a real run with torch.cuda.max_memory_allocated); left out: CUDA and
NCCL workspaces, allocator fragmentation, all-to-all buffers beyond the dispatched rows, pipeline stages.
"""

from __future__ import annotations

from typing import NamedTuple

from nanoseek.config import ModelConfig, fmt_count
from nanoseek.cost import load_config
from nanoseek.peak import GPUS
from nanoseek.table import Table

GPU_MEMORY = {name: gpu.memory for name, gpu in GPUS.items() if gpu.memory}  # bytes of HBM (peak.GPUS)


class Plan(NamedTuple):
    params: int  # N: main model + MTP
    expert_params: int  # routed experts among them
    block_max: int  # B_max: parameters of the largest block on one GPU (E/P routed experts)
    root: int  # R: embedding, head, final norm
    weights: float  # bytes per GPU, each row below
    gathered: float
    gradients: float
    block_gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return (self.weights + self.gathered + self.gradients + self.block_gradients + self.optimizer
                + self.activations)


def _block_params(cfg: ModelConfig, layer: int, ep: int) -> tuple[int, int]:
    """(parameters of layer `layer` one GPU gathers (E/ep routed experts), its routed expert parameters)."""
    p = cfg.block_params(layer)
    return p.attention + p.norms + p.router + p.ffn + p.routed // ep, p.routed


def _activations_per_token(cfg: ModelConfig, layer: int, act_bytes: int) -> float:
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    attn = 2 * H + 2 * (cfg.q_lora_rank or 0) + 2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim + \
        nh * (2 * cfg.qk_head_dim + 2 * cfg.v_head_dim)
    if cfg.is_moe_layer(layer):
        I = cfg.moe_intermediate_size
        ffn = 2 * H + cfg.num_experts_per_tok * (H + 3 * I) + 3 * cfg.n_shared_experts * I
        return (attn + ffn) * act_bytes + 4 * cfg.n_routed_experts
    return (attn + 2 * H + 3 * cfg.intermediate_size) * act_bytes


def memory_plan(cfg: ModelConfig, dp: int, ep: int = 1, micro_batch: int = 1, seq_len: int = 4096,
                act_bytes: int = 2, param_bytes: int = 2) -> Plan:
    """Bytes per GPU (module docstring). dp: GPUs (data-parallel degree); ep: divides dp and the experts."""
    for name, value in (("--dp", dp), ("--ep", ep), ("--micro-batch", micro_batch), ("--seq-len", seq_len)):
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} {value} must be a positive integer")
    if dp % ep:
        raise ValueError(f"--ep {ep} must divide --dp {dp} (expert-parallel groups are made of data-parallel GPUs)")
    if cfg.n_routed_experts % ep:
        raise ValueError(f"--ep {ep} must divide the {cfg.n_routed_experts} routed experts")
    L = cfg.num_hidden_layers
    layers = list(range(L + cfg.num_nextn_predict_layers))  # MTP depth k is a block at index L + k - 1
    p = cfg.num_params()
    N = p.total + p.mtp
    blocks = [_block_params(cfg, i, ep) for i in layers]
    experts = sum(r for _, r in blocks)
    root = p.embedding + p.head + cfg.hidden_size
    block_max = max(b for b, _ in blocks)
    H = cfg.hidden_size
    per_token = sum(_activations_per_token(cfg, i, act_bytes) for i in layers) + act_bytes * (
        2 * H + 2 * H * cfg.num_nextn_predict_layers)
    return Plan(N, experts, block_max, root, weights=4 * N / dp, gathered=param_bytes * (root + 2 * block_max),
                gradients=4 * N / dp, block_gradients=4 * block_max, optimizer=8 * N / dp,
                activations=micro_batch * seq_len * per_token)


def _gib(b: float) -> str:
    return f"{b / 2**30:,.2f} GiB"


def main(args) -> int:
    """`nanoseek plan` (options in cli.py)."""
    cfg, name = load_config(args)
    plan = memory_plan(cfg, args.dp, args.ep, args.micro_batch, args.seq_len)
    t = Table()
    t.section("model", f"model: {name}")
    t.add("params", "parameters N (main + MTP)", plan.params, fmt_count)
    t.add("expert_params", "routed experts among them", plan.expert_params, fmt_count)
    t.add("block_max", f"largest block on one GPU (E/{args.ep} routed experts)", plan.block_max, fmt_count)
    t.section("memory", f"memory per GPU: {args.dp} GPUs, ep {args.ep} ({args.dp // args.ep} copies of each "
                        f"expert block), {args.micro_batch} x {args.seq_len} tokens per micro-batch")
    t.add("weights", "weights, sharded (fp32 master) 4N/D", plan.weights, _gib)
    t.add("gathered", "weights gathered for compute (bf16) 2(R + 2 B_max)", plan.gathered, _gib)
    t.add("gradients", "gradients, sharded (fp32) 4N/D", plan.gradients, _gib)
    t.add("block_gradients", "one block's gradients before reduce-scatter (fp32)", plan.block_gradients, _gib)
    t.add("optimizer", "AdamW m and v, sharded (fp32) 8N/D", plan.optimizer, _gib)
    t.add("activations", "activations (bf16, no recomputation; estimate)", plan.activations, _gib)
    t.add("total", "total", plan.total, _gib)
    if args.gpu:
        if args.gpu not in GPU_MEMORY:
            raise ValueError(f"--gpu {args.gpu}: memory known for {', '.join(sorted(GPU_MEMORY))}")
        free = GPU_MEMORY[args.gpu] - plan.total
        t.add("headroom", f"left on one {args.gpu} ({GPU_MEMORY[args.gpu] / 1e9:g} GB)", free,
              lambda b: _gib(b) if b >= 0 else f"does not fit: {_gib(-b)} short", "datasheet")
    t.notes.append("layout and formulas: nanoseek/plan.py; estimates, not measurements")
    print(t.to_json() if args.json else t.render())
    return 0
