"""MFU in a training run never passes 100%: a GEMM peak measured under load at start-up is re-measured (with a
warning) at the first step that outruns it, and report.md names the peak it used."""

import json

import pytest

from nanoseek import peak as peak_mod
from nanoseek.train.loop import run


def test_a_peak_measured_under_load_gives_no_mfu_above_one(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(peak_mod, "_PEAKS", {})
    monkeypatch.setattr(peak_mod.time, "sleep", lambda s: None)
    measured = [(1e3, "other processes kept 1.00 cores busy")] * 2 + [(1e12, "")]  # start-up (2 tries), again

    def measure(device="cpu", precision="fp32", repeats=10):
        flops, busy = measured.pop(0)
        return flops, {"other_cores": 1.0 if busy else 0.0, "thread_share": 0.5 if busy else 1.0, "busy": busy}
    monkeypatch.setattr(peak_mod, "measure_at_idle", measure)
    with pytest.warns(peak_mod.StalePeakWarning, match="the peak is stale"):
        run(make_cfg("steps=4"), quiet=True)
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    mfu = [r["mfu"] for r in steps if "mfu" in r]
    assert len(mfu) == 4 and all(0 < m <= 1 for m in mfu) and not measured
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| MFU against (GEMM peak per device) | 1,000 GFLOP/s (measured at idle, " in report
    assert json.loads((tmp_path / "cache" / "peak.json").read_text()).popitem()[1]["flops"] == 1e12
