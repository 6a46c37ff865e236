"""The command line: overrides anywhere on it, overrides a command would ignore refused, and relative paths
in run files found from any working directory."""

import pytest

from nanoseek.cli import main, parse_args
from nanoseek.rl.loop import load_grpo_config
from nanoseek.train.config import load_train_config

# every command that takes key=value overrides: the arguments it needs besides them, and one flag of it
WITH_OVERRIDES = [(["model", "tiny"], "--no-forward"), (["cost", "--preset", "tiny"], "--json"),
                  (["plan", "--dp", "2", "--preset", "tiny"], "--json"), (["train", "--config", "x.toml"], "--quiet"),
                  (["sft", "--config", "x.toml"], "--quiet"), (["rl", "--config", "x.toml"], "--quiet"),
                  (["distill", "--student-config", "x.toml"], "--quiet")]


@pytest.mark.parametrize("command, flag", WITH_OVERRIDES, ids=[c[0] for c, _ in WITH_OVERRIDES])
def test_overrides_may_follow_flags(command, flag):
    """`nanoseek train --config X --quiet out_dir=Y`: argparse alone stops the overrides at the first flag."""
    assert parse_args([*command, "a=1", flag, "b=2", "c.d=3"]).overrides == ["a=1", "b=2", "c.d=3"]
    assert parse_args([*command, flag, "out_dir=Y"]).overrides == ["out_dir=Y"]


def test_what_is_not_an_override_is_still_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["train", "--quiet", "out_dir=Y", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # export takes no overrides
        parse_args(["export", "run", "out", "x=1"])
    assert "unrecognized arguments: x=1" in capsys.readouterr().err


@pytest.mark.parametrize("argv, asked", [
    (["train", "--quantize", "int4"], "--quantize"), (["sft", "init=runs/x", "--group-size=64"], "--group-size=64"),
    (["rl", "--quantize-head"], "--quantize-head"), (["distill", "quantize=int8"], "quantize=int8"),
    (["train", "model.quantize=int4"], "model.quantize=int4"),
    (["distill", "distill.quantize=int4"], "distill.quantize=int4"), (["demo", "--quantize", "int8"], "--quantize"),
], ids=lambda a: " ".join(a) if isinstance(a, list) else None)
def test_a_training_command_refuses_quantize(capsys, argv, asked):
    """Quantized weights are for inference: a training command says so, and where --quantize is taken."""
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and f"{argv[0]} {asked}: quantized weights are for inference only (the packed " \
        "int8/int4 weights are not trainable); --quantize is an option of generate, chat, serve and eval" in err
    assert ("distill.teacher_quantize=int8|int4" in err) == (argv[0] == "distill")
    assert parse_args(["rl", "group_size=4"]).overrides == ["group_size=4"]  # GRPO's G, not a quantization's
    assert parse_args(["distill", "distill.teacher_quantize=int4"]).overrides == ["distill.teacher_quantize=int4"]


@pytest.mark.parametrize("override, message", [
    ("out_dir=X", "'out_dir=X' would be ignored: the student is written to distill.out_dir/student; did you mean "
                  "distill.out_dir=X?"),
    ("data.path=S", "'data.path=S' would be ignored"),
    ("teacher=runs/grpo", "did you mean 'distill.teacher'"),
])
def test_distill_refuses_an_override_it_would_ignore(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.chdir(tmp_path)
    argv = ["distill", "distill.teacher=runs/grpo", "preset=tiny", "steps=20", override, "--quiet"]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "X").exists()  # refused before any work


def test_relative_paths_in_run_files(tmp_path, monkeypatch):
    """configs/grpo.toml's `init = "runs/nano"`: beside the run file when there, else the working directory,
    else an error that names both; an override replaces the file's value before it is looked up."""
    configs, work = tmp_path / "configs", tmp_path / "work"
    (configs / "runs" / "nano").mkdir(parents=True)
    (work / "runs" / "base").mkdir(parents=True)
    (work / "shards").mkdir()
    monkeypatch.chdir(work)
    grpo = configs / "grpo.toml"
    grpo.write_text('init = "runs/nano"\n')
    assert load_grpo_config(grpo).init == str(configs / "runs" / "nano")  # beside the file
    grpo.write_text('init = "runs/base"\n')
    assert load_grpo_config(grpo).init == "runs/base"  # the working directory
    grpo.write_text('init = "runs/none"\n')
    with pytest.raises(ValueError) as err:
        load_grpo_config(grpo)
    assert (f"init = 'runs/none' in {grpo}: a relative path is looked up beside the run file "
            f"({configs / 'runs' / 'none'}), then in the working directory ({work / 'runs' / 'none'}); neither exists"
            in str(err.value))
    assert load_grpo_config(grpo, ["init=runs/base"]).init == "runs/base"  # overridden: the file's is not used
    sft = configs / "sft.toml"
    sft.write_text('preset = "tiny"\ninit = "runs/nano"\n[data]\npath = "shards"\n')
    cfg = load_train_config(sft)
    assert (cfg.init, cfg.data.path) == (str(configs / "runs" / "nano"), "shards")
    sft.write_text('preset = "tiny"\n[data]\npath = "missing"\n')
    with pytest.raises(ValueError, match="data.path = 'missing' in .*neither exists"):
        load_train_config(sft)
