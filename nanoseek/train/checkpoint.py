"""A single process's checkpoints for exact resume: safetensors and JSON only (nothing is ever unpickled).

    RUN/checkpoints/step_000100/
        model.safetensors       weights under Hugging Face DeepseekV3 names (router biases included, fp32)
        optimizer.safetensors   AdamW moments and step counts, keyed "<param name>.<state>"
        state.json              step, data-loader position, RNG states, optimizer hyperparameters, config
    RUN/checkpoints/latest      name of the newest complete checkpoint (the layout: nanoseek/runs.py)
A distributed run writes dcp/ (sharded model and optimizer) instead of optimizer.safetensors (nanoseek/parallel).

A checkpoint is written into a temporary directory, fsynced, then renamed into place, and `latest` is
replaced atomically after it (runs.py): a kill at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from nanoseek.runs import (CheckpointError, load_tensors, param_groups, param_names, publish, read_state, staging,
                           write_synced)


def model_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.hf_state_dict(mtp_copies=False).items()}


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name."""
    names = param_names(model, optimizer)
    return {f"{names[idx]}.{key}": value.detach().contiguous().cpu().clone()
            for idx, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write step_N atomically; `extra` adds named safetensors files (e.g. an RL reference model)."""
    tmp, final = staging(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups = param_groups(optimizer)
    write_synced(tmp / "model.safetensors", lambda p: save_file(model_tensors(model), p, metadata={"format": "pt"}))
    write_synced(tmp / "optimizer.safetensors", lambda p: save_file(optimizer_tensors(model, optimizer), p))
    for name, tensors in (extra or {}).items():
        write_synced(tmp / name, lambda p, t=tensors: save_file(t, p))
    write_synced(tmp / "state.json", lambda p: p.write_text(json.dumps({**state, "step": step, "param_groups": groups})))
    return publish(tmp, final, keep_last)


def load_checkpoint(path: Path, model, optimizer=None) -> dict:
    """Restore weights (and optimizer state) in place; return state.json's contents."""
    state = read_state(path)
    tensors = load_tensors(path / "model.safetensors")
    try:
        model.load_hf_state_dict(tensors)
    except ValueError as e:
        raise CheckpointError(f"{path / 'model.safetensors'} does not fit the model: {e}") from None
    if optimizer is not None:
        _load_optimizer(path, model, optimizer, state)
    return state


def _load_optimizer(path: Path, model, optimizer, state: dict) -> None:
    file = path / "optimizer.safetensors"
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_tensors(file).items():
        name, _, state_key = key.rpartition(".")
        by_param.setdefault(name, {})[state_key] = value
    params = [p for g in optimizer.param_groups for p in g["params"]]
    restored = {}
    for idx, (name, p) in enumerate(zip(param_names(model, optimizer), params)):
        entry = by_param.get(name)
        if not entry:
            raise CheckpointError(f"{file} has no optimizer state for {name}")
        for key, value in entry.items():
            if key != "step" and value.shape != p.shape:
                raise CheckpointError(f"{file}: {name}.{key} has shape {tuple(value.shape)}, the parameter "
                                      f"{tuple(p.shape)}")
        restored[idx] = entry
    groups = state["param_groups"]
    if len(groups) != len(optimizer.param_groups):
        raise CheckpointError(f"{path / 'state.json'}: {len(groups)} parameter groups, the optimizer has "
                              f"{len(optimizer.param_groups)}")
    sd = optimizer.state_dict()
    sd["state"] = restored
    sd["param_groups"] = [{**g, "params": cur["params"]} for g, cur in zip(groups, sd["param_groups"])]
    optimizer.load_state_dict(sd)
