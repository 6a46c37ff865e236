import math

import pytest

from nanoseek import ModelConfig
from nanoseek.train.config import OptimConfig, TrainConfig, load_train_config
from nanoseek.train.optim import lr_at


def test_toml_run_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nsteps = 50\n[model]\nnum_nextn_predict_layers = 2\n'
                    '[optim]\nlr = 1e-3\nschedule = "wsd"\n[data]\nseq_len = 128\n')
    cfg = load_train_config(path, ["optim.lr=2e-3", "batch_size=3"])
    assert (cfg.preset, cfg.steps, cfg.batch_size, cfg.data.seq_len) == ("tiny", 50, 3, 128)
    assert cfg.model.num_nextn_predict_layers == 2 and cfg.model.hidden_size == 64
    assert cfg.optim.lr == 2e-3 and cfg.optim.schedule == "wsd"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["stpes=3"], "unknown field 'stpes' in TrainConfig; did you mean 'steps'"),
    (["optim.lrr=1"], "unknown field 'lrr' in OptimConfig; did you mean 'lr'"),
    (["model.hidden_sise=3"], "did you mean 'hidden_size'"),
    (["optim.schedule=linear"], "optim.schedule='linear' must be one of"),
    (["steps=0"], "steps=0 must be a positive integer"),
    (["steps=many"], "steps='many': expected an integer"),
    (["preset=huge"], "preset='huge' is unknown"),
    (["model.n_group=3"], "n_routed_experts=16 is not divisible by n_group=3"),
    (["device=tpu"], "device='tpu' must be auto, cpu, cuda or cuda:N"),
])
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(ValueError) as err:
        load_train_config(None, overrides)
    assert message in str(err.value)


def test_bad_run_files(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_train_config(tmp_path / "none.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3")
    with pytest.raises(ValueError, match="is not valid TOML"):
        load_train_config(bad)


def test_v3_schedule_shape():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, decay_frac=0.5, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup
    assert all(lr == 1.0 for lr in lrs[10:50])  # constant
    assert lrs[-1] == pytest.approx(0.1)  # cosine down to 10%
    assert all(a >= b for a, b in zip(lrs[50:], lrs[51:]))
    assert lrs[75] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 25 / 49)))


def test_wsd_schedule_decays_linearly():
    cfg = OptimConfig(lr=1.0, warmup_steps=0, schedule="wsd", decay_frac=0.2, min_lr_ratio=0.0)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[79] == 1.0 and lrs[-1] == pytest.approx(0.0)
    steps = [a - b for a, b in zip(lrs[80:], lrs[81:])]
    assert max(steps) == pytest.approx(min(steps))


def test_loss_weight_schedules():
    cfg = TrainConfig(steps=100)
    assert cfg.mtp_weight(0) == 0.3 and cfg.mtp_weight(99) == 0.1
    assert cfg.gamma(0) == 1e-3 and cfg.gamma(99) == 0.0


@pytest.mark.parametrize("name", ["tiny", "nano", "small"])
def test_shipped_run_files_validate(name):
    from pathlib import Path

    cfg = load_train_config(Path(__file__).parents[2] / "configs" / f"{name}.toml")
    assert cfg.preset == name and cfg.model == ModelConfig.preset(name)


def test_a_nested_field_given_at_top_level_is_pointed_to():
    with pytest.raises(ValueError, match="unknown field 'warmup_steps' in TrainConfig; did you mean 'optim.warmup_steps'"):
        load_train_config(None, ["warmup_steps=3"])
