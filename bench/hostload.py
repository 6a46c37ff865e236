"""The host under a benchmark: whether other processes use its cores (/proc/stat), waiting for it to be idle,
a guard that records (and with a wait, redoes) disturbed timed sections, and its memory read bandwidth.

On a shared 2-vCPU host another process at full load on one core makes 2-thread OpenMP runs up to ~30x slower,
so every timed section records the cores others used meanwhile.
"""

from __future__ import annotations

import os
import time

import torch


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    try:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_load(seconds: float = 2.0) -> float:
    """Cores kept busy by other processes over a short idle wait."""
    b0, o0, t0 = cpu_busy_s(), own_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (cpu_busy_s() - b0) - (own_cpu_s() - o0)) / (time.perf_counter() - t0)


def wait_idle(limit_s: float, log) -> float:
    """Wait (up to limit_s) until other processes use < 0.15 cores; return the last reading."""
    t0, said = time.perf_counter(), -1e9
    busy = other_load()
    while busy >= 0.15 and time.perf_counter() - t0 < limit_s:
        if time.perf_counter() - said > 60:
            log(f"  other processes keep {busy:.2f} cores busy; waiting (up to {limit_s:.0f} s) ...")
            said = time.perf_counter()
        time.sleep(5)
        busy = other_load()
    return busy


class Guard:
    """Runs a timed section and measures the cores other processes used meanwhile. With wait_s > 0 it first
    waits for an idle machine and redoes a section that was disturbed (> 0.25 cores elsewhere), up to twice."""

    def __init__(self, wait_s: float, log):
        self.wait_s, self.log, self.record = wait_s, log, {}

    def __call__(self, label: str, fn):
        for attempt in range(3):
            if self.wait_s:
                wait_idle(self.wait_s, self.log)
            b0, o0, t0 = cpu_busy_s(), own_cpu_s(), time.perf_counter()
            out = fn()
            other = max(0.0, (cpu_busy_s() - b0) - (own_cpu_s() - o0)) / (time.perf_counter() - t0)
            self.record[label] = other
            if other <= 0.25 or not self.wait_s or attempt == 2:
                if other > 0.25:
                    self.log(f"  ({label}: other processes kept {other:.2f} cores busy: disturbed)")
                return out
            self.log(f"  ({label}: other processes kept {other:.2f} cores busy; measuring again)")


def bandwidth_gbs() -> float:
    """Read bandwidth: the best of a few sums over a 256 MiB buffer (filled, so its pages are mapped)."""
    x = torch.ones(64 * 1024 * 1024)
    best = float("inf")
    for _ in range(4):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best / 1e9


def report_load(results: dict, guard: Guard, t_all: float, cpu0: float, own0: float, log) -> None:
    """Record and print the run's wall time and how busy other processes kept the cores (on average since
    t_all / cpu0 / own0, and the worst timed section)."""
    results["other_cores_busy_per_section"] = guard.record
    results["wall_s"] = wall = time.perf_counter() - t_all
    other = max(0.0, (cpu_busy_s() - cpu0) - (own_cpu_s() - own0)) / wall
    results["other_cores_busy_during_run"] = other
    worst = max(guard.record.items(), key=lambda kv: kv[1], default=("-", 0.0))
    log(f"\ntotal {wall:.0f} s (waits included); other processes kept {other:.2f} cores busy on average, at most "
        f"{worst[1]:.2f} during a timed section ({worst[0]})"
        + (" -> timings disturbed: rerun on an idle machine, e.g. with --wait-idle 600" if worst[1] > 0.25 else ""))
