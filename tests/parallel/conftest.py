"""Launch W gloo ranks from a test: spawned processes with torchrun's environment on a free port.

`spawn(fn, world, *args)` runs fn(rank, world, *args) in each rank (fn must be a module-level function)
and returns the exit codes and the rank outputs; a job that outlives `timeout` is killed and fails."""

import os
import socket
import sys
import time
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, log, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    with open(log, "w") as f:
        sys.stdout = sys.stderr = f
        try:
            fn(rank, world, *args)
        except BaseException:
            traceback.print_exc()
            f.flush()
            os._exit(1)
        f.flush()
    os._exit(0)


def spawn(fn, world: int, *args, tmp_path, timeout: float = 120.0) -> tuple[list[int], list[str]]:
    ctx = mp.get_context("spawn")
    port = free_port()
    logs = [tmp_path / f"rank{r}.log" for r in range(world)]
    procs = [ctx.Process(target=_entry, args=(fn, r, world, port, str(logs[r]), args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join()
    outs = [log.read_text() if log.exists() else "" for log in logs]
    assert not hung, f"ranks {hung} still running after {timeout} s:\n" + "\n".join(outs)
    return [p.exitcode for p in procs], outs


def check(codes, outs):
    assert codes == [0] * len(codes), "\n".join(f"--- rank {r} (exit {c})\n{o}" for r, (c, o) in
                                               enumerate(zip(codes, outs)))
