import io
import json

from nanoseek.cli import main
from nanoseek.hf import load_pretrained
from nanoseek.infer.chat import complete, repl
from nanoseek.infer.engine import Engine, generate
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.text import readable


def test_generate_command(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "12+7="}) + "\n")
    (tmp_path / "p.txt").write_text("3+4=\n\n5-2=\n")
    args = ["generate", str(run), "--prompt", "1+1=", "--prompts", str(tmp_path / "p.jsonl"), "--max-tokens", "12",
            "--json", "--speculative"]
    assert main(args) == 0
    out = capsys.readouterr()
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["prompt"] for r in rows] == ["1+1=", "12+7="]
    assert "MTP draft acceptance" in out.err
    pre = load_pretrained(run)
    ids = pre.tokenizer.apply_chat([{"role": "user", "content": "12+7="}])
    expected = generate(pre.model, [ids], SamplingParams(max_tokens=12), stop_ids=(pre.tokenizer.eos_id,))[0]
    assert rows[1]["completion_tokens"] == len(expected)
    assert rows[1]["text"] == pre.tokenizer.decode([t for t in expected if t != pre.tokenizer.eos_id])
    assert main(["generate", str(run), "--prompts", str(tmp_path / "p.txt"), "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.count("### ") == 2


def test_generate_command_errors(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}) + "\n")
    assert main(["generate", str(run), "--prompts", str(tmp_path / "bad.jsonl")]) == 2
    assert 'bad.jsonl:1: needs a string "prompt" field' in capsys.readouterr().err
    assert main(["generate", str(run)]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "x", "--max-tokens", "100000"]) == 2
    assert "exceeds the context of" in capsys.readouterr().err
    assert main(["generate", str(run), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p=0.0 must be in (0, 1]" in capsys.readouterr().err


def test_chat_keeps_history_and_resets(tiny_run):
    run, _ = tiny_run
    pre = load_pretrained(run)
    engine = Engine(pre.model, pre.tokenizer, max_batch=2)
    out = io.StringIO()
    repl(engine, SamplingParams(max_tokens=6), io.StringIO("hello\n\nagain\n/reset\nhi\n/quit\nnever read\n"), out)
    text = out.getvalue()
    assert text.count("tok/s") == 3 and "(history cleared)" in text and "never" not in text
    # the first reply equals a one-shot completion of the same prompt, shown as a person reads it
    first = complete(Engine(pre.model, pre.tokenizer), ["hello"], SamplingParams(max_tokens=6))[0]
    assert readable(first["content"]) in text


def test_generate_quantized(tiny_run, capsys):
    """--quantize int4 loads the (fp32) run quantized, in bf16: the same tokens as quantizing it loaded in bf16."""
    from nanoseek.quant import Spec, quantize

    run, _ = tiny_run
    assert main(["generate", str(run), "--prompt", "12+7=", "--max-tokens", "12", "--json", "--speculative",
                 "--quantize", "int4", "--group-size", "32"]) == 0
    out = capsys.readouterr()
    row = json.loads(out.out)
    assert "int4 (groups of 32)" in out.err
    pre = load_pretrained(run, dtype="bfloat16")  # a quantized load computes in bf16 unless --dtype says
    model = quantize(pre.model, Spec(4, 32))
    ids = pre.tokenizer.apply_chat([{"role": "user", "content": "12+7="}])
    expected = generate(model, [ids], SamplingParams(max_tokens=12), stop_ids=(pre.tokenizer.eos_id,))[0]
    assert row["text"] == pre.tokenizer.decode([t for t in expected if t != pre.tokenizer.eos_id])
    assert main(["generate", str(run), "--prompt", "x", "--quantize", "int4", "--group-size", "48"]) == 2
    assert "must be one of (32, 64, 128, 256)" in capsys.readouterr().err
