"""The peak FLOP/s MFU is measured against: GPUs' dense tensor-core peaks from their
datasheets (`GPUS`, no 2:4 sparsity); on a CPU, the best GEMM measurement taken at idle, through the faster of
the two GEMM libraries torch carries (BLAS and oneDNN: kernels/gemm.py), cached per machine (CPU model and family,
threads, torch version, dtype, libraries) in the user's cache directory (`gemm_peak`). A measurement taken
while the cores are busy never enters the cache, and a run's peak is never below its own throughput
(`honest_peak`: MFU <= 1; a stale peak is re-measured, with a warning).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from datetime import date
from pathlib import Path
from typing import NamedTuple


# ---------------------------------------------------------------------- hardware
class GPU(NamedTuple):
    name: str
    peaks: dict  # precision -> dense FLOP/s; None: measured on the spot
    source: str
    memory: float | None = None  # bytes of HBM (datasheet), for `nanoseek plan`


GPUS: dict[str, GPU] = {
    "h800": GPU("NVIDIA H800 SXM5", {"bf16": 989.5e12, "fp8": 1979e12},
                "NVIDIA H800 Tensor Core GPU datasheet: BF16 1,979 / FP8 3,958 TFLOP/s with 2:4 sparsity, dense is "
                "half; the H100 SXM5's compute (NVLink cut to 400 GB/s, FP64 cut)", 80e9),
    "h100": GPU("NVIDIA H100 SXM5", {"bf16": 989.5e12, "fp8": 1979e12},
                "NVIDIA H100 Tensor Core GPU datasheet (SXM5): BF16 1,979 / FP8 3,958 TFLOP/s with 2:4 sparsity, "
                "dense is half", 80e9),
    "h200": GPU("NVIDIA H200 SXM", {"bf16": 989.5e12, "fp8": 1979e12},
                "NVIDIA H200 Tensor Core GPU datasheet (SXM): BF16 1,979 / FP8 3,958 TFLOP/s with 2:4 sparsity, "
                "dense is half; the H100's compute with 141 GB of HBM3e at 4.8 TB/s", 141e9),
    "a100": GPU("NVIDIA A100 SXM", {"bf16": 312e12},
                "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOP/s dense (624 with sparsity); no FP8", 80e9),
    "cpu": GPU("this machine's CPU", {"fp32": None},
               "measured now: max over 3 repeats of an fp32 n^3 product at n = 2048 and 4096, through BLAS (torch.mm) "
               "and oneDNN"),
}


def measure_gemm_peak(dtype=None, sizes: tuple[int, ...] = (2048, 4096), repeats: int = 3, device=None) -> float:
    """Peak matmul FLOP/s: the fastest library's rate (kernels/gemm.py `rates`)."""
    from nanoseek.kernels.gemm import rates

    return max(rates(sizes, repeats, dtype, device).values())


# ---------------------------------------------------------------------- the peak MFU is measured against
BUSY_CORES = 0.25  # a measurement is under load when other processes use more cores than this (bench/hostload.py)
MIN_SHARE = 0.75  # or when the measuring thread runs less than this share of the wall time (cores oversubscribed)
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}  # precision -> the dtype a peak is measured in
LIBRARIES = {"blas": "BLAS (torch.mm)", "onednn": "oneDNN"}  # kernels/gemm.py `rates`' keys


class Peak(NamedTuple):
    """The dense GEMM peak (FLOP/s per device) that MFU is measured against, and where it came from."""
    flops: float
    origin: str  # datasheet | measured at idle | cached | measured under load | this run's throughput
    detail: str  # the GPU, or the date (and the cache file, or why the measurement cannot stand)
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (| fp8 on a GPU)

    def __str__(self) -> str:
        return f"{self.rate} ({self.origin}, {self.detail})"

    @property
    def rate(self) -> str:
        return f"{self.flops / 1e12:,.0f} TFLOP/s" if self.flops >= 1e13 else f"{self.flops / 1e9:,.0f} GFLOP/s"


class StalePeakWarning(RuntimeWarning):
    """A run went faster than its GEMM peak: the peak had been measured while the cores were busy."""


def peak_cache_path() -> Path:
    """$NANOSEEK_CACHE_DIR/peak.json, else $XDG_CACHE_HOME/nanoseek/peak.json, else ~/.cache/nanoseek/peak.json."""
    env = os.environ.get
    return Path(env("NANOSEEK_CACHE_DIR") or Path(env("XDG_CACHE_HOME") or Path.home() / ".cache", "nanoseek"),
                "peak.json")


def cpu_name(cpuinfo: str) -> str:
    """The first processor of a /proc/cpuinfo text: its model name, with its family and model numbers where
    given ("AMD EPYC (family 25, model 17)"). Virtual machines may show a bare "AMD EPYC" for chips as
    different as Zen 4 (family 25: oneDNN ~200 GFLOP/s on 2 threads) and Zen 5 (family 26: ~430)."""
    fields = {}
    for line in cpuinfo.split("\n\n")[0].splitlines():
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    numbers = ", ".join(f"{label} {fields[k]}" for label, k in (("family", "cpu family"), ("model", "model"))
                        if fields.get(k))
    return fields.get("model name", "") + (f" ({numbers})" if numbers else "")


def chip(device: str = "cpu") -> str:
    """The device's name: the GPU's, or the CPU's (`cpu_name` of /proc/cpuinfo, else what platform knows)."""
    import platform

    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpu = cpu_name(open("/proc/cpuinfo").read())
    except OSError:
        cpu = ""
    return cpu or platform.processor() or platform.machine()


def peak_key(device: str, precision: str) -> str:
    """What a measured peak belongs to: the `chip`, torch's threads and version, the dtype, the GEMM libraries
    measured (kernels/gemm.py `rates`). E.g. "AMD EPYC (family 25, model 17) | 2 threads | torch 2.13.0+cpu |
    float32 | blas+onednn"."""
    import torch

    from nanoseek.kernels.gemm import onednn_product

    dtype = DTYPES.get(precision, precision)
    libraries = "blas+onednn" if torch.device(device).type == "cpu" and dtype == "float32" and onednn_product() \
        else "torch.mm"
    return f"{chip(device)} | {torch.get_num_threads()} threads | " \
           f"torch {torch.__version__} | {dtype} | {libraries}"


def cached_peaks() -> dict[str, dict]:
    """The peak cache: key -> {"flops", "date", "other_cores", "thread_share"}; {} if absent or unreadable."""
    try:
        return json.loads(peak_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _cache_peak(key: str, entry: dict) -> None:
    """Raise the cached peak of `key` to `entry` (never lower it), atomically: a temporary file, then a rename."""
    peaks, path = cached_peaks(), peak_cache_path()
    if peaks.get(key, {}).get("flops", 0.0) < entry["flops"]:
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({**peaks, key: entry}, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"the GEMM peak was not cached in {path}: {e}", stacklevel=3)


def _busy_s() -> float:
    """Busy CPU seconds of the whole machine (/proc/stat: all but idle and iowait), nan without /proc."""
    try:
        f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    except OSError:
        return math.nan
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")


def measure_at_idle(device: str = "cpu", precision: str = "fp32", repeats: int = 10) -> tuple[float, dict]:
    """A GEMM peak (kernels/gemm.py `rates`' best, 2048^3 on CPU, max of `repeats`) and the load during it:
    "other_cores" (cores other processes kept busy: /proc/stat minus this process), "thread_share" (the
    measuring thread's CPU time / wall time: below 1 when the cores are oversubscribed, by this process's own
    threads too), and
    "busy": why the measurement cannot stand for the machine ("" when clean; GPUs are not checked), "gemms":
    each library's GFLOP/s."""
    import torch

    from nanoseek.kernels import gemm

    cuda, own = torch.device(device).type == "cuda", lambda: sum(os.times()[:2])
    b0, o0, c0, t0 = _busy_s(), own(), time.thread_time(), time.perf_counter()
    rates = gemm.rates((8192,) if cuda else (2048,), repeats, getattr(torch, DTYPES.get(precision, "bfloat16")),
                       device)
    wall = max(time.perf_counter() - t0, 1e-9)
    other, share = max(0.0, _busy_s() - b0 - (own() - o0)) / wall, (time.thread_time() - c0) / wall
    busy = "" if cuda else f"other processes kept {other:.2f} cores busy" if other > BUSY_CORES else \
        f"the measuring thread ran {share:.0%} of the time" if share < MIN_SHARE else ""
    return max(rates.values()), {"other_cores": round(other, 3), "thread_share": round(share, 3), "busy": busy,
                                 "gemms": {k: round(v / 1e9, 1) for k, v in rates.items()}}


def _libraries(entry: dict) -> str:
    """", oneDNN (BLAS 194 GFLOP/s)": the library a measurement's peak came from, where it names them."""
    rates = entry.get("gemms") or {}
    if len(rates) < 2:
        return ""
    best = max(rates, key=rates.get)
    return f", {LIBRARIES[best]} ({', '.join(f'{LIBRARIES[k]} {v:,.0f} GFLOP/s' for k, v in rates.items() if k != best)})"


_PEAKS: dict[str, Peak] = {}  # per process: the peak in use, per `peak_key`


def gemm_peak(device: str = "cpu", precision: str = "fp32", again: bool = False, attempts: int = 2) -> Peak:
    """The peak MFU is measured against. A GPU in `GPUS`: its datasheet's dense peak (bf16 unless `precision` is
    listed). Otherwise the best clean measurement cached for this machine (`peak_key`, `peak_cache_path`),
    measured (up to `attempts` times while the cores are busy) when none is cached or `again`. A clean
    measurement raises the cache; one under load is never cached and stands in only where it beats the cache."""
    import torch

    if torch.device(device).type == "cuda":
        gpu = next((g for k, g in GPUS.items() if k != "cpu" and k in torch.cuda.get_device_name(device).lower()), None)
        if gpu is not None:
            p = precision if precision in gpu.peaks else "bf16"
            return Peak(gpu.peaks[p], "datasheet", f"{gpu.name} {p} dense", device, precision)
    key, today = peak_key(device, precision), date.today().isoformat()
    if key in _PEAKS and not again:
        return _PEAKS[key]
    entry = cached_peaks().get(key)
    best = Peak(entry["flops"], "cached", f"measured at idle on {entry['date']}{_libraries(entry)} in "
                f"{peak_cache_path()}", device, precision) if entry else _PEAKS.get(key)
    loaded: tuple[float, dict] = (0.0, {})
    for attempt in range(attempts if best is None or again else 0):
        flops, load = measure_at_idle(device, precision)
        if not load.pop("busy"):
            _cache_peak(key, {"flops": flops, "date": today, **load})
            if best is None or flops > best.flops:
                best = Peak(flops, "measured at idle", today + _libraries(load), device, precision)
            break
        loaded = max(loaded, (flops, load), key=lambda m: m[0])
        time.sleep(0.5 if attempt + 1 < attempts else 0)
    else:
        if loaded[0] > (best.flops if best is not None else 0.0):
            best = Peak(loaded[0], "measured under load", f"{today}: other processes kept "
                        f"{loaded[1]['other_cores']:.2f} cores busy, this thread ran {loaded[1]['thread_share']:.0%} "
                        f"of the time; a lower bound", device, precision)
    _PEAKS[key] = best
    return best


def honest_peak(peak: Peak, achieved: float) -> Peak:
    """`peak`, unless `achieved` FLOP/s per device exceeds it (an MFU above 100%: a peak measured while the
    cores were busy). Then warn (StalePeakWarning), measure again (raising the cache if clean; once: not after
    a measurement already fell short), and where that stays below `achieved`, take `achieved` (a machine that
    did X FLOP/s peaks at X or more): achieved / peak.flops <= 1 by construction."""
    if not achieved > peak.flops:  # also with a nan peak (ranks other than 0 log no MFU)
        return peak
    new = peak
    if peak.origin not in ("datasheet", "this run's throughput"):
        warnings.warn(f"this run did {achieved / 1e9:,.0f} GFLOP/s per device, above the GEMM peak {peak}: the peak "
                      f"is stale (measured while the cores were busy); measuring it again", StalePeakWarning, 2)
        new = gemm_peak(peak.device, peak.precision, again=True)
    return new if achieved <= new.flops else new._replace(flops=achieved, origin="this run's throughput", detail=(
        f"{date.today().isoformat()}: above the {new.origin} peak, {new.rate}"))


def peak_flops(gpu: str, precision: str | None = None) -> tuple[float, str, str]:
    """(dense peak FLOP/s, precision, "datasheet" or "measured") of a `GPUS` entry; precision defaults to the
    first the entry lists (bf16 for GPUs, fp32 for cpu)."""
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu} is unknown; choose one of {', '.join(sorted(GPUS))}")
    peaks = GPUS[gpu].peaks
    precision = precision or next(iter(peaks))
    if precision not in peaks:
        raise ValueError(f"--precision {precision} is not available on {gpu}; choose one of {', '.join(peaks)}")
    if peaks[precision] is None:
        return measure_gemm_peak(), precision, "measured"
    return peaks[precision], precision, "datasheet"
