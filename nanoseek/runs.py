"""The run directory's checkpoints: their layout, atomic writing and checked reading (safetensors and JSON
only), shared by the single-process writer (train/checkpoint.py), the distributed one (parallel/checkpoint.py)
and every loader.

    RUN/checkpoints/step_000100/    one complete checkpoint, written in .tmp-step_000100/, fsynced, renamed
    RUN/checkpoints/latest          the name of the newest complete one, replaced atomically after it

A kill at any moment leaves the previous checkpoint intact and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
DIST_FILES = ("model.safetensors", "state.json")  # plus dcp/ (sharded model and optimizer state)


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or does not fit the run."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (None before the first)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {path.name}, which does not exist")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, write) -> None:
    """write(path), then fsync the file: it is on disk before the directory holding it is renamed."""
    write(path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def param_names(model, optimizer) -> list[str]:
    """The model's name for each parameter, in the optimizer's order (its state is keyed by that index)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def param_groups(optimizer) -> list[dict]:
    """The optimizer's hyperparameters per group (without the parameter lists), for state.json."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def staging(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(temporary directory, final directory) of step_N's checkpoint; `publish` renames one to the other."""
    final = checkpoint_dir(run_dir, step)
    return final.with_name(f".tmp-{final.name}"), final


def publish(tmp: Path, final: Path, keep_last: int) -> Path:
    """Rename the complete checkpoint `tmp` to `final`, point `latest` at it, keep the newest keep_last."""
    root = final.parent
    _fsync_dir(tmp)
    if final.exists():  # the same step saved again after a resume
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = root / ".latest.tmp"
    write_synced(latest_tmp, lambda p: p.write_text(final.name))
    os.replace(latest_tmp, root / "latest")
    _fsync_dir(root)
    for old in sorted(root.glob("step_*"))[:-keep_last]:
        shutil.rmtree(old)
    return final


def read_state(path: Path) -> dict:
    """state.json of a complete checkpoint: single-process (FILES) or distributed (DIST_FILES, see
    nanoseek/parallel/checkpoint.py)."""
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
