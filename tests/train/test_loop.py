import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.kernels import gemm
from nanoseek.train import checkpoint as ckpt_mod
from nanoseek.runs import CheckpointError
from nanoseek.train.loop import resolve_data, run, train

TIMING = {"tok_s", "mfu", "elapsed"}


def records(run_dir, kind="loss"):
    lines = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in lines if kind in r]


def test_loss_falls_and_artifacts_exist(make_cfg, tmp_path):
    cfg = make_cfg("steps=40", "optim.lr=5e-3", "eval_every=20", "ckpt_every=20")
    result = run(cfg, quiet=True)
    recs = records(tmp_path / "run")
    assert len(recs) == 40
    first, last = sum(r["main"] for r in recs[:3]) / 3, sum(r["main"] for r in recs[-3:]) / 3
    assert last < first - 1.0
    assert {"main", "mtp", "balance", "lr", "grad_norm", "max_vio"} <= set(recs[-1])
    assert len(records(tmp_path / "run", "val_loss")) == 2
    for f in ("report.md", "plots/loss.png", "plots/lr.png", "plots/expert_load.png", "config.json"):
        assert (tmp_path / "run" / f).is_file(), f
    report = (tmp_path / "run" / "report.md").read_text()
    assert "total FLOPs" in report and "device-hours" in report and "MFU" in report
    assert result.config.model.vocab_size % 64 == 0


def test_resume_is_bit_exact(make_cfg, tmp_path):
    """A run killed after its step-4 checkpoint and resumed equals the run that never stopped, bit for bit."""
    cfg, shard_dir, _ = resolve_data(make_cfg(out="full"))
    full = train(cfg, shard_dir, quiet=True)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "checkpoints" / "step_000008")
    (killed / "checkpoints" / "latest").write_text("step_000004")
    cfg2, _, _ = resolve_data(make_cfg(out="killed"))
    resumed = train(cfg2, shard_dir, resume=True, quiet=True)
    assert records(killed) == records(tmp_path / "full")
    assert records(killed, "val_loss") == records(tmp_path / "full", "val_loss")
    for (n, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), n
    a = load_file(tmp_path / "full/checkpoints/step_000008/optimizer.safetensors")
    b = load_file(killed / "checkpoints/step_000008/optimizer.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_kill_at_any_moment_leaves_a_good_checkpoint(make_cfg, tmp_path):
    """SIGKILL a real `nanoseek train` process mid-run; --resume then finishes the run."""
    cfg = make_cfg("steps=400", "ckpt_every=2", "eval_every=1000", out="proc")
    args = [f"preset=tiny", f"data.path={cfg.data.path}", f"out_dir={cfg.out_dir}", "steps=400", "batch_size=4",
            "data.seq_len=64", "log_every=1", "ckpt_every=2", "eval_every=1000", "optim.warmup_steps=2"]
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "train", *args, "--quiet", "--eval-problems", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "proc" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text() >= "step_000010"):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), proc.stderr.read().decode()[-2000:]
    step = int(latest.read_text().split("_")[1])
    assert 10 <= step < 400
    cfg2, shard_dir, _ = resolve_data(make_cfg("steps=400", "ckpt_every=2", "eval_every=1000", out="proc"))
    result = train(cfg2, shard_dir, resume=True, quiet=True)
    assert result.last["step"] == 400
    steps = [r["step"] for r in records(tmp_path / "proc")]
    assert steps == list(range(1, 401))


def test_interrupted_save_keeps_the_previous_checkpoint(make_cfg, tmp_path, monkeypatch):
    cfg, shard_dir, _ = resolve_data(make_cfg())
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def failing(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # the second checkpoint's optimizer file
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        train(cfg, shard_dir, quiet=True)
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    assert (tmp_path / "run/checkpoints/latest").read_text() == "step_000004"
    result = train(cfg, shard_dir, resume=True, quiet=True)
    assert result.last["step"] == 8


def test_corrupt_or_incompatible_checkpoints_are_named(make_cfg, tmp_path):
    cfg, shard_dir, _ = resolve_data(make_cfg())
    train(cfg, shard_dir, quiet=True)
    other, _, _ = resolve_data(make_cfg("model.num_nextn_predict_layers=0"))
    with pytest.raises(CheckpointError, match="model.safetensors does not fit the model"):
        train(other, shard_dir, resume=True, quiet=True)
    weights = tmp_path / "run/checkpoints/step_000008/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="step_000008/model.safetensors is corrupt or truncated"):
        train(cfg, shard_dir, resume=True, quiet=True)
    (tmp_path / "run/checkpoints/step_000008/state.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete: state.json is missing"):
        train(cfg, shard_dir, resume=True, quiet=True)


def test_loss_free_balancing_reduces_max_violation(make_cfg):
    """Routing starts skewed (two experts favoured by +0.3); the bias update undoes it, gamma = 0 does not."""
    def skew(model):
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias[:2] = 0.3

    vio = {}
    for gamma in (0.0, 0.01):
        cfg, shard_dir, _ = resolve_data(make_cfg("steps=40", f"bias_gamma={gamma}", f"bias_gamma_late={gamma}",
                                                  "ckpt_every=100", "eval_every=100", out=f"g{gamma}"))
        train(cfg, shard_dir, quiet=True, init=skew)
        recs = records(Path(cfg.out_dir))
        vio[gamma] = sum(max(r["max_vio"]) for r in recs[-10:]) / 10
    assert vio[0.01] < 0.5 * vio[0.0]


def test_gradient_accumulation_matches_one_big_batch(make_cfg):
    cfg_a, shard_dir, _ = resolve_data(make_cfg("steps=3", "batch_size=4", "grad_accum=1", out="a"))
    cfg_b, _, _ = resolve_data(make_cfg("steps=3", "batch_size=2", "grad_accum=2", out="b"))
    a = train(cfg_a, shard_dir, quiet=True)
    b = train(cfg_b, shard_dir, quiet=True)
    ra, rb = records(Path(cfg_a.out_dir)), records(Path(cfg_b.out_dir))
    for x, y in zip(ra, rb):
        assert x["main"] == pytest.approx(y["main"], rel=1e-5)
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("overrides", [["model.num_nextn_predict_layers=0"], ["mtp_lambda=0", "mtp_lambda_late=0"]])
def test_mtp_off(make_cfg, overrides):
    cfg, shard_dir, _ = resolve_data(make_cfg("steps=2", *overrides))
    train(cfg, shard_dir, quiet=True)
    assert all("mtp" not in r for r in records(Path(cfg.out_dir)))


def test_an_existing_run_is_never_overwritten(make_cfg):
    cfg, shard_dir, _ = resolve_data(make_cfg("steps=4"))
    train(cfg, shard_dir, quiet=True)
    with pytest.raises(ValueError, match="already holds a run \\(last checkpoint step_000004\\); pass --resume"):
        train(cfg, shard_dir, quiet=True)


@pytest.mark.skipif(gemm.onednn_product() is None, reason="this torch has no oneDNN")
def test_a_resume_in_another_process_takes_the_recorded_gemm_library(make_cfg, tmp_path):
    """Two processes: `nanoseek train` with kernels.gemm=onednn to step 8 records its library in config.json;
    a second `nanoseek train --resume` with the default gemm=auto from step 4 takes the recorded library, not a
    new measurement, and ends bit for bit where the first process did."""
    cfg = make_cfg(out="full")
    args = ["preset=tiny", f"data.path={cfg.data.path}", "steps=8", "batch_size=4", "data.seq_len=64",
            "log_every=1", "eval_every=4", "eval_batches=2", "ckpt_every=4", "optim.warmup_steps=2",
            "model.hidden_size=256", "model.moe_intermediate_size=128"]  # products large enough for oneDNN

    def nanoseek_train(*extra):
        subprocess.run([sys.executable, "-m", "nanoseek", "train", *args, *extra, "--quiet", "--eval-problems", "0"],
                       check=True, capture_output=True, timeout=300)
    nanoseek_train(f"out_dir={tmp_path / 'full'}", "kernels.gemm=onednn")
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "checkpoints" / "step_000008")
    (killed / "checkpoints" / "latest").write_text("step_000004")
    (killed / "config.json").unlink()  # the library must come from the checkpoint itself
    nanoseek_train(f"out_dir={killed}", "--resume")
    assert json.loads((killed / "config.json").read_text())["kernels"]["gemm"] == "onednn"
    assert records(killed) == records(tmp_path / "full")
    a = load_file(tmp_path / "full/checkpoints/step_000008/model.safetensors")
    b = load_file(killed / "checkpoints/step_000008/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
