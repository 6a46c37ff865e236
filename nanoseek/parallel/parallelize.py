"""Data parallel (FSDP2) plus expert parallel, applied to a plain single-device model from outside.

Layout (torchtitan's "dp2ep"; DeepSeek-V3's EP inside ZeRO-1 DP, DeepSeek-V3 report §3.2). W ranks, each reading its
own slice of every global batch, form a 2-D mesh (dp, ep) with dp = W / ep:

    ranks  [[0 .. ep-1], [ep .. 2ep-1], ...]     a row is an expert-parallel group (consecutive ranks:
                                                 one node's NVLink on GPUs), a column a dp group
    dense parameters (attention, norms, dense FFNs, gate, shared experts, embedding, head):
        fully_shard over all W ranks; gradients averaged over W
    routed experts: E/ep per rank (its row position), fully_shard over its dp column; the gradient that
        arrives there already sums its ep group's tokens, so it is divided by W, not by dp

With one rank's loss l_r = W n_r / N * mean_r (n_r its targets, N the global count), the average over W
ranks is the mean over the global batch's tokens: W ranks x B/W rows train as one process with B rows.
Backends: NCCL on CUDA, gloo on CPU. Mixed precision on GPU: bf16 parameters and compute, fp32 gradient
reduction and fp32 master weights and AdamW state. Left out: tensor and pipeline parallelism (DualPipe),
DeepEP, meta-device initialisation (every rank builds the full model first, then keeps its shards).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard

from nanoseek.parallel import DistError
from nanoseek.parallel.ep import apply_expert_parallel
from nanoseek.model.mtp import mtp_targets


@dataclass
class Parallel:
    """This process's place in the job: ranks, meshes and the device it computes on."""

    rank: int
    world: int
    ep: int
    device: torch.device
    mesh: DeviceMesh  # (dp, ep)
    world_mesh: DeviceMesh  # (W,)
    expert_mesh: DeviceMesh  # (ep, dp): the same ranks, ep first (checkpoints address experts this way)
    timeout: float
    owns_group: bool  # init_process_group was called here (destroy it at the end)

    @property
    def dp(self) -> int:
        return self.world // self.ep

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self.mesh.get_group("ep")

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world} (dp {self.dp} x ep {self.ep}, {self.backend} on {self.device})"

    @property
    def backend(self) -> str:
        return dist.get_backend()


def launched() -> bool:
    """Whether this process was started by torchrun (or another launcher setting WORLD_SIZE and RANK)."""
    return dist.is_initialized() or ("WORLD_SIZE" in os.environ and "RANK" in os.environ)


def init_parallel(ep: int, timeout: float, device: str = "auto", batch_size: int | None = None) -> Parallel:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) and build the (dp, ep) mesh. Checks the layout before any communication."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ["WORLD_SIZE"])
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    if world % ep:
        raise ValueError(f"ep={ep} must divide the world size {world} (ranks come in expert-parallel groups "
                         f"of ep); launch a multiple of {ep} processes or choose ep among "
                         f"{[d for d in range(1, world + 1) if world % d == 0]}")
    if batch_size is not None and batch_size % world:
        raise ValueError(f"batch_size={batch_size} (the global batch) must be divisible by the world size "
                         f"{world}: each rank reads batch_size / world_size rows")
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is available")
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout),
                                device_id=dev if use_cuda else None)
    mesh = init_device_mesh(dev.type, (world // ep, ep), mesh_dim_names=("dp", "ep"))
    world_mesh = init_device_mesh(dev.type, (world,), mesh_dim_names=("world",))
    expert_mesh = DeviceMesh(dev.type, mesh.mesh.t().contiguous(), mesh_dim_names=("ep", "dp"))
    return Parallel(rank, world, ep, dev, mesh, world_mesh, expert_mesh, timeout, owns)


def close(par: Parallel) -> None:
    if par.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def parallelize(model: torch.nn.Module, par: Parallel, bf16: bool = False) -> torch.nn.Module:
    """Expert parallel (ep > 1), then FSDP2: experts over their dp column, each block and the rest over
    all ranks. bf16: MixedPrecisionPolicy(param bf16, reduce fp32). Modifies and returns `model`."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    if par.ep > 1:
        dp_mesh = par.mesh["dp"]
        for experts in apply_expert_parallel(model, par.ep_group):
            # torchtitan's rule: shard the expert dim over dp only if every rank gets whole experts
            dim = 0 if experts.n_local % par.dp == 0 else 1
            fully_shard(experts, mesh=dp_mesh, mp_policy=mp, shard_placement_fn=lambda p, d=dim: Shard(d))
            experts.set_gradient_divide_factor(float(par.world))
    for block in [*model.layers, *model.mtp]:
        fully_shard(block, mesh=par.world_mesh, mp_policy=mp)
    fully_shard(model, mesh=par.world_mesh, mp_policy=mp)
    return model


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """||g||_2 over all parameters of all ranks, and g *= min(1, max_norm / (||g|| + 1e-6)) (as
    torch.nn.utils.clip_grad_norm_). Every parameter is sharded over disjoint ranks (dense over W, experts
    over ep x dp), so ||g||^2 is one all-reduce of the local sums of squares."""
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    if not all(isinstance(p, DTensor) for p in model.parameters()):
        raise AssertionError("clip_grad_norm expects every parameter sharded by parallelize()")
    sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    sq = sq.to(next(model.parameters()).device)
    dist.all_reduce(sq)
    norm = sq.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype) if grads else coef)
    return float(norm)


def loss_weights(labels: torch.Tensor, depths: int, world: int) -> list[float]:
    """W n_r / N for the main loss and each MTP depth k (targets mtp_targets(labels, k)): one all-reduce
    of this rank's target counts. 1.0 for all when every rank has as many targets (pretraining)."""
    counts = [labels] + [mtp_targets(labels, k) for k in range(1, depths + 1)]
    n = torch.stack([(c != -100).sum() for c in counts]).double()
    total = n.clone()
    dist.all_reduce(total)
    return (n * world / total.clamp_min(1)).tolist()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """The mean over ranks of each float (one all-reduce)."""
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, (t / dist.get_world_size()).tolist()))


def failed_collective(error: BaseException) -> bool:
    """Whether `error` came out of torch.distributed: a DistError (timeout, NCCL) or gloo's RuntimeError
    ("Connection closed by peer" when a rank died)."""
    if isinstance(error, dist.DistError):
        return True
    tb = error.__traceback__
    while tb is not None:
        if f"{os.sep}torch{os.sep}distributed{os.sep}" in tb.tb_frame.f_code.co_filename:
            return isinstance(error, RuntimeError)
        tb = tb.tb_next
    return False


def collective_failure(par: Parallel, error: BaseException) -> DistError:
    """A failed collective turned into one clear message (the others' view of a dead or stuck rank)."""
    return DistError(f"{par.describe()}: a collective failed, so another rank died, was killed or did not "
                     f"answer within dist_timeout={par.timeout:g} s; this rank stops too. "
                     f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})")
