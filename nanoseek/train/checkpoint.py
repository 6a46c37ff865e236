"""Atomic checkpoints for exact resume: safetensors and JSON only (nothing is ever unpickled).

    RUN/checkpoints/step_000100/
        model.safetensors       weights under Hugging Face DeepseekV3 names (router biases included, fp32)
        optimizer.safetensors   AdamW moments and step counts, keyed "<param name>.<state>"
        state.json              step, data-loader position, RNG states, optimizer hyperparameters, config
    RUN/checkpoints/latest      name of the newest complete checkpoint (the layout: nanoseek/runs.py)
A distributed run writes dcp/ (sharded model and optimizer) instead of optimizer.safetensors (nanoseek/dist).

A checkpoint is written into a temporary directory, fsynced, then renamed into place, and `latest` is
replaced atomically after it: a kill at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanoseek.runs import CheckpointError, checkpoint_dir

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
DIST_FILES = ("model.safetensors", "state.json")  # plus dcp/ (sharded model and optimizer state)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, write) -> None:
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def model_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu().clone() for k, v in model.hf_state_dict(mtp_copies=False).items()}


def param_names(model, optimizer) -> list[str]:
    """The model's name for each parameter, in the optimizer's order (its state is keyed by that index)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def param_groups(optimizer) -> list[dict]:
    """The optimizer's hyperparameters per group (without the parameter lists), for state.json."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    """AdamW state keyed by parameter name."""
    names = param_names(model, optimizer)
    return {f"{names[idx]}.{key}": value.detach().contiguous().cpu().clone()
            for idx, state in optimizer.state_dict()["state"].items() for key, value in state.items()}


def staging(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary directory, final directory) of step_N's checkpoint; `publish` renames one to the other."""
    final = checkpoint_dir(run_dir, step)
    return final.with_name(f".tmp-{final.name}"), final


def save_checkpoint(run_dir: Path, step: int, model, optimizer, state: dict, keep_last: int,
                    extra: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write step_N atomically; `extra` adds named safetensors files (e.g. an RL reference model)."""
    tmp, final = staging(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups = param_groups(optimizer)
    _write(tmp / "model.safetensors", lambda p: save_file(model_tensors(model), p, metadata={"format": "pt"}))
    _write(tmp / "optimizer.safetensors", lambda p: save_file(optimizer_tensors(model, optimizer), p))
    for name, tensors in (extra or {}).items():
        _write(tmp / name, lambda p, t=tensors: save_file(t, p))
    _write(tmp / "state.json", lambda p: p.write_text(json.dumps({**state, "step": step, "param_groups": groups})))
    return publish(tmp, final, keep_last)


def publish(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename the complete checkpoint `tmp` to `final`, point `latest` at it, keep the newest keep_last."""
    root = final.parent
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = root / ".latest.tmp"
    _write(latest_tmp, lambda p: p.write_text(final.name))
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def read_state(path: Path) -> dict:
    """state.json of a complete checkpoint: single-process (FILES) or distributed (DIST_FILES, see
    nanoseek/dist/checkpoint.py)."""
    for f in DIST_FILES if (path / "dcp").is_dir() else FILES:
        if not (path / f).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f} is missing")
    try:
        return json.loads((path / "state.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / 'state.json'} is corrupt: {e}") from None


def load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file} is corrupt or truncated: {e}") from None


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
