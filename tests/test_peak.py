"""The GEMM peak MFU is measured against (nanoseek.peak): cached per machine across processes, never lowered
by a measurement under load (one test with real busy threads), and re-measured where an MFU would pass 100%."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

from nanoseek import peak as peak_mod
from nanoseek.kernels import gemm
from nanoseek.kernels.gemm import onednn_product


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """An empty peak cache in tmp_path and no peak known to this process."""
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(peak_mod, "_PEAKS", {})
    return tmp_path / "cache" / "peak.json"


def measurements(monkeypatch, *values):
    """Replace the measurement by `values`: (FLOP/s, "" when clean or why it is under load), one per call."""
    calls = list(values)

    def measure(device="cpu", precision="fp32", repeats=10):
        flops, busy = calls.pop(0)
        return flops, {"other_cores": 0.9 if busy else 0.0, "thread_share": 0.5 if busy else 1.0, "busy": busy}
    monkeypatch.setattr(peak_mod, "measure_at_idle", measure)
    monkeypatch.setattr(peak_mod.time, "sleep", lambda s: None)
    return calls


def test_the_chip_is_named_with_its_family_and_model():
    """Two hosts whose model name is a bare "AMD EPYC" (Zen 4 and Zen 5, twice apart in fp32 rate) get two keys."""
    zen = "processor\t: {0}\nvendor_id\t: AuthenticAMD\ncpu family\t: {1}\nmodel\t\t: {2}\nmodel name\t: AMD EPYC\n"
    zen4 = "\n".join(zen.format(i, 25, 17) for i in range(2))
    assert peak_mod.cpu_name(zen4) == "AMD EPYC (family 25, model 17)"
    assert peak_mod.cpu_name(zen.format(0, 26, 2)) == "AMD EPYC (family 26, model 2)"
    assert peak_mod.cpu_name("processor\t: 0\nmodel name\t: Some CPU\n") == "Some CPU"
    assert peak_mod.cpu_name("") == ""


def test_the_key_names_the_machine():
    key = peak_mod.peak_key("cpu", "fp32")
    chip, threads, version, dtype, libraries = key.split(" | ")
    assert chip and threads == f"{torch.get_num_threads()} threads" and version == f"torch {torch.__version__}"
    assert dtype == "float32" and peak_mod.peak_key("cpu", "bf16").endswith("| bfloat16 | torch.mm")
    assert libraries == ("blas+onednn" if onednn_product() else "torch.mm")  # an older BLAS-only entry: a miss


@pytest.mark.skipif(onednn_product() is None, reason="this torch has no oneDNN")
def test_the_peak_is_the_faster_librarys(monkeypatch, cache):
    """Both libraries are measured; the peak is the faster one's, and the report names both."""
    rates = gemm.rates(sizes=(256,), repeats=1)
    assert set(rates) == {"blas", "onednn"} and min(rates.values()) > 0
    monkeypatch.setattr(peak_mod, "measure_at_idle", lambda device, precision: (4.3e11, {
        "other_cores": 0.0, "thread_share": 1.0, "busy": "", "gemms": {"blas": 190.0, "onednn": 430.0}}))
    p = peak_mod.gemm_peak("cpu")
    assert p.flops == 4.3e11 and p.detail.endswith(", oneDNN (BLAS (torch.mm) 190 GFLOP/s)")
    monkeypatch.setattr(peak_mod, "_PEAKS", {})
    cached = peak_mod.gemm_peak("cpu")
    assert cached.origin == "cached" and "oneDNN (BLAS (torch.mm) 190 GFLOP/s) in " in cached.detail


def test_the_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    assert peak_mod.peak_cache_path() == tmp_path / "cache" / "peak.json"
    monkeypatch.delenv("NANOSEEK_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert peak_mod.peak_cache_path() == tmp_path / "xdg" / "nanoseek" / "peak.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert peak_mod.peak_cache_path() == peak_mod.Path.home() / ".cache" / "nanoseek" / "peak.json"


def test_a_cached_peak_survives_processes(monkeypatch, cache):
    measurements(monkeypatch, (1.5e11, ""))
    first = peak_mod.gemm_peak("cpu")
    assert (first.flops, first.origin) == (1.5e11, "measured at idle")
    entry = json.loads(cache.read_text())[peak_mod.peak_key("cpu", "fp32")]
    assert entry["flops"] == 1.5e11 and entry["date"] == first.detail and entry["thread_share"] == 1.0
    code = (f"import torch; torch.set_num_threads({torch.get_num_threads()}); from nanoseek import peak as peak_mod; "
            "peak_mod.measure_at_idle = None; p = peak_mod.gemm_peak('cpu'); print(p.flops, p.origin)")  # no measuring
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.split() == ["150000000000.0", "cached"]


def test_the_cache_is_keyed_by_machine(monkeypatch, cache):
    cache.parent.mkdir(parents=True)
    other = peak_mod.peak_key("cpu", "fp32").replace(" threads", "0 threads")  # the same chip, 10x the threads
    cache.write_text(json.dumps({other: {"flops": 9e12, "date": "2025-01-01"}}))
    measurements(monkeypatch, (1.2e11, ""))
    assert peak_mod.gemm_peak("cpu").flops == 1.2e11  # a miss: measured here
    assert json.loads(cache.read_text())[other]["flops"] == 9e12  # the other machine's entry is kept


def test_a_measurement_under_load_never_lowers_or_enters_the_cache(monkeypatch, cache):
    calls = measurements(monkeypatch, (4e10, "other processes kept 0.90 cores busy"), (5e10, "busy"),
                         (1.6e11, ""), (1e11, "busy"), (1e11, "busy"), (1.4e11, ""), (1.8e11, ""))
    under = peak_mod.gemm_peak("cpu")  # nothing cached: the better of 2 attempts stands in, uncached
    assert (under.flops, under.origin) == (5e10, "measured under load") and "lower bound" in under.detail
    assert not cache.exists()
    assert peak_mod.gemm_peak("cpu") is under  # known to this process: not measured again
    assert peak_mod.gemm_peak("cpu", again=True).flops == 1.6e11  # clean: cached
    assert peak_mod.gemm_peak("cpu", again=True).origin == "cached"  # two measurements under load lower nothing
    assert peak_mod.gemm_peak("cpu", again=True).flops == 1.6e11  # a lower clean one neither
    assert peak_mod.gemm_peak("cpu", again=True).flops == 1.8e11  # a higher one raises it
    assert json.loads(cache.read_text())[peak_mod.peak_key("cpu", "fp32")]["flops"] == 1.8e11 and not calls


def test_a_busy_thread_is_seen(monkeypatch, cache):
    """Real load, real detection: busy threads multiplying matrices (the GIL released) oversubscribe the cores,
    so the measuring thread runs part of the time; the measurement is not cached."""
    real = peak_mod.measure_at_idle
    monkeypatch.setattr(peak_mod, "measure_at_idle", lambda device, precision: real(device, precision, repeats=2))
    stop = threading.Event()

    def spin():
        a = torch.randn(512, 512)
        while not stop.is_set():
            a @ a
    # twice as many threads wanting a core as there are cores, whatever torch's thread count
    threads = [threading.Thread(target=spin, daemon=True) for _ in range(max(2, 2 * os.cpu_count()
                                                                              // torch.get_num_threads()))]
    try:
        for t in threads:
            t.start()
        flops, load = real("cpu", "fp32", repeats=2)
        peak = peak_mod.gemm_peak("cpu", attempts=1)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert load["busy"] and (load["thread_share"] < peak_mod.MIN_SHARE or load["other_cores"] > peak_mod.BUSY_CORES)
    assert peak.origin == "measured under load" and not cache.exists()


def test_an_mfu_above_one_remeasures_the_stale_peak(monkeypatch, cache):
    measurements(monkeypatch, (2e11, ""), (1e11, ""))
    stale = peak_mod.Peak(5e10, "measured under load", "a lower bound")
    assert peak_mod.honest_peak(stale, 4e10) is stale  # MFU 0.8: kept
    with pytest.warns(peak_mod.StalePeakWarning, match="stale"):
        new = peak_mod.honest_peak(stale, 1.5e11)
    assert (new.flops, new.origin) == (2e11, "measured at idle") and cache.exists()  # MFU 0.75
    with pytest.warns(peak_mod.StalePeakWarning):
        above = peak_mod.honest_peak(new, 3e11)  # measured again (1e11, lower): the run's own throughput stands
    assert (above.flops, above.origin) == (3e11, "this run's throughput")
    assert peak_mod.honest_peak(above, 3.5e11).flops == 3.5e11  # raised again without measuring (none left)
    sheet = peak_mod.Peak(989.5e12, "datasheet", "NVIDIA H200 SXM bf16 dense", "cuda")
    assert peak_mod.honest_peak(sheet, 1e15).origin == "this run's throughput"  # never measured


def test_gpus_use_the_datasheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    peak = peak_mod.gemm_peak("cuda", "bf16")
    assert (peak.flops, peak.origin) == (989.5e12, "datasheet") and str(peak).startswith("990 TFLOP/s (datasheet")
    assert peak_mod.gemm_peak("cuda:0", "fp8").flops == 1979e12
