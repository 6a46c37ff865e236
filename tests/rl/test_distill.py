import json

import pytest

from nanoseek.cli import main
from nanoseek.data.shards import ShardSet
from nanoseek.data.tasks import get_task
from nanoseek.hf import load_pretrained
from nanoseek.infer.engine import Engine
from nanoseek.infer.sampling import SamplingParams
from nanoseek.quant import QuantExperts, QuantLinear
from nanoseek.rl import distill as distill_mod
from nanoseek.rl.distill import DistillConfig, select_verified
from nanoseek.rl.evaluate import sample_seed


def test_only_verified_distinct_completions_are_kept():
    p, q = get_task("add").sample(2, seed=3, difficulty=2, unique=True)
    right = p.completion
    wrong = right.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
    two_answers = right + f"<answer>{p.answer}</answer>"
    kept = select_verified([p, q], [[wrong, right, right, two_answers], [wrong, "", q.completion]], per_prompt=2)
    assert kept == [(p, right), (q, q.completion)]
    assert select_verified([p], [[right, right.replace("<think>", "<think> ")]], per_prompt=1) == [(p, right)]


def test_distill_command_trains_a_student_on_verified_samples(tiny_run, tmp_path, monkeypatch, capsys):
    run, _ = tiny_run

    # half right, half wrong: a stand-in for a good teacher (a trained one is too slow for the suite; the real
    # sampling is tested above), so that the student's training on verified samples runs
    def teacher(model, tok, problems, cfg, progress):
        return [[p.completion if i % 2 == 0 else "<think></think><answer>-1</answer>" for i in range(cfg.k)]
                for p in problems]

    monkeypatch.setattr(distill_mod, "sample_teacher", teacher)
    out = tmp_path / "distill"
    args = ["distill", f"distill.teacher={run}", f"distill.out_dir={out}", "distill.tasks=add",
            "distill.prompts=40", "distill.k=2", "preset=tiny", "steps=3", "batch_size=2", "data.seq_len=32",
            "eval_every=3", "eval_batches=1", "ckpt_every=3", "--quiet"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 80 and summary["verified"] == 40 and summary["kept"] == 40
    rows = [json.loads(line) for line in (out / "distill.jsonl").read_text().splitlines()]
    task = get_task("add")
    assert all(r["messages"][1]["content"].endswith("</answer>") for r in rows)
    assert all(task.check(p, p.answer) for p in task.sample(1))
    assert (out / "student" / "checkpoints" / "latest").is_file()
    assert "student report" in capsys.readouterr().out


def test_a_student_folder_learns_from_the_teachers_texts_in_its_own_tokens(tiny_run, deepseek_folder, tmp_path,
                                                                          monkeypatch):
    """A nanoseek teacher, a DeepSeek student (init=FOLDER): the verified texts are rendered with the student's
    chat template and tokenized by its tokenizer, and the student fine-tunes on them."""
    run, _ = tiny_run
    monkeypatch.setattr(distill_mod, "sample_teacher", lambda model, tok, problems, cfg, progress: [
        [p.completion] * cfg.k for p in problems])
    out = tmp_path / "distill"
    assert main(["distill", f"distill.teacher={run}", f"distill.out_dir={out}", "distill.tasks=add",
                 "distill.prompts=200", "distill.k=1", f"init={deepseek_folder}", "steps=2", "batch_size=2",
                 "data.seq_len=16", "eval_every=2", "eval_batches=1", "ckpt_every=2", "mtp_lambda=0", "--quiet"]) == 0
    tok = ShardSet.open(out / "shards").tokenizer()
    assert tok.path.parent.resolve() == deepseek_folder.resolve() and tok.chat_markers[1] == tok.token_to_id("<｜Assistant｜>")
    assert (out / "student" / "checkpoints" / "latest").is_file()


def test_teacher_sampling_is_the_engines_seeded_sampling(tiny_run):
    """The real teacher path: k completions per problem from the chat prompt, each with its own seed: what the
    engine gives for that request alone, and the same on a second call."""
    pre = load_pretrained(tiny_run[0])
    problems = get_task("add").sample(3, seed=1)
    cfg = DistillConfig(k=2, max_tokens=12, temperature=1.0)
    out = distill_mod.sample_teacher(pre.model, pre.tokenizer, problems, cfg, progress=False)
    assert [len(texts) for texts in out] == [2, 2, 2] and out[0][0] != out[0][1]
    assert distill_mod.sample_teacher(pre.model, pre.tokenizer, problems, cfg, progress=False) == out
    for p, texts in zip(problems, out):
        for i, text in enumerate(texts):
            engine = Engine(pre.model, pre.tokenizer)
            r = engine.add(pre.tokenizer.apply_chat([{"role": "user", "content": p.prompt}]), SamplingParams(
                max_tokens=12, temperature=1.0, top_p=cfg.top_p, seed=sample_seed(cfg.seed, p.prompt, i)))
            engine.run()
            assert r.text == text


def test_distill_with_nothing_verified_says_so(tiny_run, tmp_path, capsys):
    """The real teacher (a model trained for 4 steps) gets nothing right: the command says so, exit code 2."""
    assert main(["distill", f"distill.teacher={tiny_run[0]}", f"distill.out_dir={tmp_path}", "distill.prompts=4",
                 "distill.max_tokens=16", "--quiet"]) == 2
    assert "got none of 8 x 4 samples right" in capsys.readouterr().err
    with pytest.raises(ValueError, match="k=0 must be a positive integer"):
        DistillConfig(k=0)


def test_a_quantized_teacher_samples_and_a_student_learns(tiny_run, tmp_path, monkeypatch):
    """distill.teacher_quantize=int4: the teacher is loaded with packed int4 weights (groups of 32, tiny's
    smallest input), its real sampling runs, and the run records the choice; bad values are refused by name."""
    run, _ = tiny_run
    seen, sample_teacher = [], distill_mod.sample_teacher

    def teacher(model, tok, problems, cfg, progress):
        seen.append({type(m) for m in model.modules()})
        real = sample_teacher(model, tok, problems, cfg, progress)
        assert [len(texts) for texts in real] == [cfg.k] * len(problems)
        return [[p.completion, "<think></think><answer>-1</answer>"] for p in problems]  # stand-in, as above

    monkeypatch.setattr(distill_mod, "sample_teacher", teacher)
    out = tmp_path / "distill"
    assert main(["distill", f"distill.teacher={run}", f"distill.out_dir={out}", "distill.tasks=add",
                 "distill.prompts=40", "distill.k=2", "distill.max_tokens=8", "distill.teacher_quantize=int4",
                 "distill.teacher_group_size=32", "preset=tiny", "steps=3", "batch_size=2", "data.seq_len=32",
                 "eval_every=3", "eval_batches=1", "ckpt_every=3", "--quiet"]) == 0
    assert QuantLinear in seen[0] and QuantExperts in seen[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["teacher_quantize"] == "int4 (groups of 32)" and summary["config"]["teacher_group_size"] == 32
    assert summary["kept"] == 40 and (out / "student" / "checkpoints" / "latest").is_file()
    with pytest.raises(ValueError, match="teacher_quantize='int3' must be one of none, int8, int4"):
        DistillConfig(teacher_quantize="int3")
    with pytest.raises(ValueError, match=r"teacher_group_size=100: int4 group size 100 must be one of"):
        DistillConfig(teacher_quantize="int4", teacher_group_size=100)
