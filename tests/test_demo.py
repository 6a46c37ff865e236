"""The demo pipeline end to end on the tiny preset: pretrain, GRPO, the time-matched SFT control, report."""

import json

from nanoseek.cli import main
from nanoseek.hf import load_pretrained
from nanoseek.rl.loop import heldout_eval, load_grpo_config


def test_demo_runs_every_stage_and_reports(tmp_path, shard_dir, capsys):
    pre, grpo, sft = tmp_path / "pre.toml", tmp_path / "grpo.toml", tmp_path / "sft.toml"
    pre.write_text(f'preset = "tiny"\nout_dir = "{tmp_path}/base"\nsteps = 4\nbatch_size = 2\neval_every = 4\n'
                   f'eval_batches = 1\nckpt_every = 4\n[data]\npath = "{shard_dir}"\nseq_len = 64\n')
    grpo.write_text(f'out_dir = "{tmp_path}/grpo"\ntasks = "add"\ndifficulty = 1\nsteps = 2\nprompts_per_step = 2\n'
                    f'group_size = 2\nmax_completion_tokens = 8\neval_problems = 4\neval_k = 2\neval_every = 2\n'
                    f'ckpt_every = 2\n')
    sft.write_text(f'out_dir = "{tmp_path}/sft"\nsteps = 50\nbatch_size = 2\neval_every = 50\neval_batches = 1\n'
                   f'ckpt_every = 50\n[data]\npath = "{shard_dir}"\nseq_len = 64\n')
    args = ["demo", "--pretrain-config", str(pre), "--grpo-config", str(grpo), "--sft-config", str(sft),
            "--out", str(tmp_path / "demo"), "--quiet"]
    assert main(args) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["evals"]) == {"pretrained", "after GRPO", "SFT control"}
    # each reported evaluation is that of its stage's final model (the same seeded held-out evaluation again)
    grpo_cfg = load_grpo_config(str(grpo), [])
    for name, run in (("pretrained", "base"), ("after GRPO", "grpo"), ("SFT control", "sft")):
        model = load_pretrained(tmp_path / run)
        assert results["evals"][name] == heldout_eval(model.model, model.tokenizer, grpo_cfg), name
    # the control trained for (about) as many seconds as GRPO did, not for its 50 steps
    sft_state = json.loads(sorted((tmp_path / "sft" / "checkpoints").glob("step_*"))[-1].joinpath("state.json")
                           .read_text())
    assert sft_state["finished"] and sft_state["elapsed"] >= results["stages"]["grpo"]["train seconds"]
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "GRPO gain in pass@1" in report and "nanoseek chat" in report
    assert "held-out pass@1: pretrained" in capsys.readouterr().out
    # a second run reuses the finished stages
    assert main(args) == 0


def test_demo_seed_changes_every_stage_and_runs_go_under_one_folder(tmp_path, shard_dir):
    """`--seed` reaches the pretraining (init, data order, corpus), GRPO and the control; `--runs` holds them all."""
    pre, grpo, sft = tmp_path / "pre.toml", tmp_path / "grpo.toml", tmp_path / "sft.toml"
    pre.write_text(f'preset = "tiny"\nsteps = 2\nbatch_size = 2\neval_every = 2\neval_batches = 1\nckpt_every = 2\n'
                   f'[data]\npath = "{shard_dir}"\nseq_len = 32\n')
    grpo.write_text('tasks = "add"\ndifficulty = 1\nsteps = 1\nprompts_per_step = 1\ngroup_size = 2\n'
                    'max_completion_tokens = 4\neval_problems = 2\neval_k = 1\nckpt_every = 1\n')
    sft.write_text(f'steps = 5\nbatch_size = 2\neval_every = 5\neval_batches = 1\nckpt_every = 5\n'
                   f'[data]\npath = "{shard_dir}"\nseq_len = 32\n')
    runs = tmp_path / "fresh"
    assert main(["demo", "--pretrain-config", str(pre), "--grpo-config", str(grpo), "--sft-config", str(sft),
                 "--seed", "7", "--runs", str(runs), "--quiet"]) == 0
    assert (runs / "demo" / "results.json").is_file()
    for stage in ("nano", "grpo", "sft"):
        state = json.loads(sorted((runs / stage / "checkpoints").glob("step_*"))[-1].joinpath("state.json")
                           .read_text())
        assert state["config"]["seed"] == 7, stage
    pre_state = json.loads(sorted((runs / "nano" / "checkpoints").glob("step_*"))[-1].joinpath("state.json")
                           .read_text())
    assert pre_state["config"]["data"]["builtin_seed"] == 7
