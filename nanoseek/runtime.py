"""What a training or RL run needs from its machine and leaves on disk: the device it runs on, its metrics log
(JSONL, one record per line, cut back on resume), and the time of a forward pass (`nanoseek model`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available")
    return torch.device(name)


def time_forward(model: torch.nn.Module, ids: torch.Tensor, repeats: int) -> float:
    """Median seconds of a no-grad forward of `model` over `ids`, after one warm-up."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return sorted(times[1:])[len(times[1:]) // 2]


class MetricsLog:
    """metrics.jsonl, one JSON object per line; on resume, records past the checkpoint are dropped."""

    def __init__(self, path: Path, keep_until: int | None):
        self.path = path
        if keep_until is None:
            path.write_text("")
        elif path.exists():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= keep_until]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.file = open(path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()
