"""The run directory's checkpoint layout, which train/checkpoint.py writes and every loader reads:

    RUN/checkpoints/step_000100/    one complete checkpoint (written elsewhere, renamed into place)
    RUN/checkpoints/latest          the name of the newest complete one, replaced atomically
"""

from __future__ import annotations

from pathlib import Path


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
