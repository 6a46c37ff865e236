"""Checkpoints of a distributed run: torch.distributed.checkpoint (DCP), written as safetensors.

    RUN/checkpoints/step_000100/
        dcp/shard-0000R-model-00001-of-00001.safetensors   rank R-1's shards of the weights and AdamW state,
                    keys "model.<name>" and "optim.<name>.<state>", with each shard's offsets in the
                    safetensors header (JSON): DCP's Hugging Face storage format, read back at any world size
        model.safetensors   the full weights under Hugging Face names, gathered to rank 0 (what export,
                    generate and init= read: a distributed run's checkpoint is used like any other)
        state.json          step, data position (global), RNG, config, AdamW hyperparameters, the layout

Routed experts are held by rank blocks of E/ep (nanoseek/parallel/ep.py), each FSDP-sharded over its dp group;
they are saved as views of the whole (E, ...) tensor on an (ep, dp) mesh, so a checkpoint does not depend
on the layout that wrote it: it loads at another world size or ep, and into one process (no process group,
`load` with par=None), where every key is a plain tensor. A single-process checkpoint (safetensors) loads
under torchrun too: each rank reads the full tensors and keeps its shards. Nothing is unpickled: DCP's own
default format keeps its metadata in a pickle, the Hugging Face format used here keeps it in JSON.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from nanoseek.parallel.ep import ExpertParallel
from nanoseek.parallel.parallelize import Parallel
from nanoseek.runs import (CheckpointError, load_tensors, param_groups, param_names, publish, read_state, staging,
                           write_synced)


def _expert_view(model, name: str, t: torch.Tensor, par: Parallel | None) -> torch.Tensor:
    """`t` (a parameter or its AdamW state) as the whole layer's tensor when it is a block of routed experts
    held by this rank: a DTensor on the (ep, dp) mesh, Shard(0) over ep, FSDP's own shard over dp."""
    owner = model.get_submodule(name.rpartition(".")[0])
    if not isinstance(owner, ExpertParallel) or t.dim() == 0:
        return t
    shape = owner.global_shape(t)
    if isinstance(t, DTensor):
        placements, t = (Shard(0), t.placements[0]), t.to_local()
    else:  # not FSDP-sharded: the whole block on every rank of the dp group
        placements = (Shard(0), Replicate())
    return DTensor.from_local(t, par.expert_mesh, placements, shape=shape, stride=_contiguous(shape))


def _contiguous(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its AdamW state (zeros) without changing it: a step with zero gradients at
    lr 0 (decoupled weight decay multiplies by 1 - 0). Loading then fills the state in place."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if all(p in optimizer.state for p in params):
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr


def state_tensors(model, optimizer, par: Parallel | None) -> dict[str, torch.Tensor]:
    """Flat {"model.<name>": weight or buffer, "optim.<name>.<state>": AdamW state}: DTensors with the
    global shapes in a distributed run (routed experts as whole-layer views), plain tensors otherwise.
    Loading writes into them in place."""
    out = {f"model.{k}": _expert_view(model, k, v, par) for k, v in model.state_dict().items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, p in zip(param_names(model, optimizer), params):
        for key, value in optimizer.state.get(p, {}).items():
            out[f"optim.{name}.{key}"] = _expert_view(model, name, value, par) if value.shape == p.shape else value
    return out


def full_weights(model, par: Parallel) -> dict[str, torch.Tensor] | None:
    """Every weight and buffer gathered whole (one tensor at a time) to rank 0's CPU; None on other ranks."""
    out = {}
    for name, t in model.state_dict().items():
        t = _expert_view(model, name, t, par)
        if isinstance(t, DTensor):  # one mesh dimension at a time, innermost first: one all-gather per call
            for dim in reversed(range(len(t.placements))):
                t = t.redistribute(placements=list(t.placements[:dim]) + [Replicate()] * (len(t.placements) - dim))
            t = t.to_local()
        full = t
        if par.rank == 0:
            out[name] = full.detach().cpu().clone()
    return out if par.rank == 0 else None


def save(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int, par: Parallel) -> Path:
    """Write step_N (all ranks call this): DCP shards from every rank, full weights and state.json from rank 0,
    then rank 0 publishes it atomically (runs.py: rename, `latest`, rotation)."""
    tmp, final = staging(run_dir, step)
    if par.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "dcp").mkdir(parents=True)
    dist.barrier()
    dcp.save(state_tensors(model, optimizer, par),
             storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / "dcp"), save_distributed=True))
    weights = full_weights(model, par)
    if par.rank == 0:
        hf = model.hf_state_dict(mtp_copies=False, state=weights)
        write_synced(tmp / "model.safetensors", lambda p: save_file({k: v.contiguous() for k, v in hf.items()}, p,
                                                               metadata={"format": "pt"}))
        layout = {"world_size": par.world, "ep": par.ep, "dp": par.dp}
        write_synced(tmp / "state.json", lambda p: p.write_text(json.dumps(
            {**state, "step": step, "param_groups": param_groups(optimizer), "layout": layout})))
        publish(tmp, final, keep_last)
    dist.barrier()
    return final


def load(path: Path, model, optimizer, par: Parallel | None) -> dict:
    """Restore weights and AdamW state in place from a distributed (dcp/) or single-process checkpoint, at
    any world size (par=None: this one process); return state.json's contents."""
    state = read_state(path)
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{path / 'state.json'}: {len(groups)} parameter groups, the optimizer has "
                              f"{len(optimizer.param_groups)}")
    init_optimizer_state(optimizer)
    targets = state_tensors(model, optimizer, par)
    if (path / "dcp").is_dir():
        try:
            with warnings.catch_warnings():  # par=None: DCP warns that it loads into a single process
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(path / "dcp")))
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{path / 'dcp'} does not fit this model and optimizer: {e}") from None
    else:
        _load_full(path, model.config, targets)
    for g, saved in zip(optimizer.param_groups, groups):
        g.update({k: v for k, v in saved.items() if k != "params"})
    return state


def _load_full(path: Path, config, targets: dict[str, torch.Tensor]) -> None:
    """A single-process checkpoint into (possibly sharded) targets: each rank reads the whole tensors."""
    from nanoseek.model import Transformer

    plain = Transformer(config)
    try:
        plain.load_hf_state_dict(load_tensors(path / "model.safetensors"))
    except ValueError as e:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model: {e}") from None
    full = {f"model.{k}": v for k, v in plain.state_dict().items()}
    full |= {f"optim.{k}": v for k, v in load_tensors(path / "optimizer.safetensors").items()}
    missing = sorted(set(targets) - set(full))
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    with torch.no_grad():
        for key, target in targets.items():
            value = full[key].to(dtype=target.dtype)
            if isinstance(target, DTensor):  # keep this rank's shard: a local slice, no communication
                value = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                          src_data_rank=None).to_local()
                target = target.to_local()
            target.copy_(value.reshape(target.shape))
