import json

import numpy as np
import pytest
import torch

from nanoseek.cli import main
from nanoseek.data.loader import TokenLoader, assistant_targets
from nanoseek.data.shards import ShardSet, prepare
from nanoseek.train.loop import resolve_data, train

A, U, B, E = 3, 2, 0, 1  # assistant, user, bos, eos ids


def test_assistant_targets_mask_reply_and_closing_eos_only():
    toks = np.array([B, U, 9, 9, A, 7, 7, E, B, U, 9, A, 7, E])
    mask, inside = assistant_targets(toks, A, (U, B, E))
    assert mask.astype(int).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    assert not inside
    # the state carries across shard boundaries
    first, inside = assistant_targets(toks[:6], A, (U, B, E))
    rest, _ = assistant_targets(toks[6:], A, (U, B, E), inside)
    assert np.concatenate([first, rest]).tolist() == mask.tolist()


def test_loader_ignores_everything_but_assistant_turns(shard_dir):
    tok = ShardSet.open(shard_dir).tokenizer()
    x, y = TokenLoader(shard_dir, batch_size=4, seq_len=64, loss_on="assistant").next_batch()
    x_all, y_all = TokenLoader(shard_dir, batch_size=4, seq_len=64).next_batch()
    assert torch.equal(x, x_all)
    kept = y != -100
    assert torch.equal(y[kept], y_all[kept])
    assert 0.2 < kept.float().mean() < 0.95
    # no prompt token is a target: user/bos tags and the assistant tag itself never are
    user, assistant = tok.chat_markers
    for special in (user, tok.bos_id, assistant):
        assert not (y[kept] == special).any()
    assert (y[kept] == tok.eos_id).any() and (y[kept] == tok.token_to_id("<think>")).any()


def test_chat_jsonl_becomes_chat_documents(tmp_path, shard_dir):
    tok = ShardSet.open(shard_dir).tokenizer()
    rows = [{"messages": [{"role": "user", "content": f"{i}+1="},
                          {"role": "assistant", "content": f"<answer>{i + 1}</answer>"}]} for i in range(50)]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    prepare([tmp_path / "chat.jsonl"], tok, tmp_path / "shards", val_fraction=0.2, progress=False)
    stream = np.concatenate([np.asarray(a) for a in ShardSet.open(tmp_path / "shards").arrays("train")])
    first = stream[: list(stream).index(tok.eos_id) + 1]
    assert tok.decode(first).startswith("<|begin_of_text|><|user|>") and tok.decode(first).count("<|end_of_text|>") == 1
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}))
    with pytest.raises(ValueError, match="bad.jsonl:1: messages\\[0\\].role='robot'"):
        prepare([tmp_path / "bad.jsonl"], tok, tmp_path / "bad", progress=False)


def test_sft_starts_from_the_init_weights_and_learns(tiny_run, shard_dir, make_cfg):
    run, model = tiny_run
    cfg = make_cfg(f"init={run}", "data.loss_on=assistant", "steps=6", "optim.lr=1e-3", "mtp_lambda=0", out="sft")
    cfg, _, _ = resolve_data(cfg)
    assert cfg.model == model.config  # the architecture comes from init, whatever the preset says
    x, y = TokenLoader(shard_dir, batch_size=4, seq_len=64, seed=cfg.seed, loss_on="assistant").next_batch()
    with torch.no_grad():
        init_loss = float(model(x, labels=y).loss)
    train(cfg, shard_dir, quiet=True)
    losses = [r["main"] for r in map(json.loads, open(f"{cfg.out_dir}/metrics.jsonl")) if "main" in r]
    assert losses[0] == pytest.approx(init_loss, rel=1e-5)  # step 1 ran on the init weights
    assert losses[-1] < losses[0]


def test_sft_command_needs_init_and_a_matching_tokenizer(tiny_run, tmp_path, capsys):
    assert main(["sft", f"out_dir={tmp_path / 'x'}"]) == 2
    assert "nanoseek sft needs init=DIR" in capsys.readouterr().err


def test_masking_a_one_row_batch_leaves_the_inputs_alone(shard_dir):
    loader = TokenLoader(shard_dir, "val", batch_size=1, seq_len=64, loss_on="assistant")
    x, y = next(loader.val_batches(1))
    assert (x >= 0).all() and (y == -100).any()


def test_sft_from_a_deepseek_folder(deepseek_folder, tmp_path):
    """`prepare --tokenizer FOLDER` renders chats with DeepSeek's template; `sft init=FOLDER` starts from the folder's
    weights, masks the loss to <｜Assistant｜> turns, learns, and its run serves with the folder's tokenizer."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                          {"role": "assistant", "content": f"{a + b}"}]} for a in range(20) for b in range(10)]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["prepare", "--input", str(tmp_path / "chat.jsonl"), "--tokenizer", str(deepseek_folder),
                 "--out", str(tmp_path / "shards"), "--val-fraction", "0.1"]) == 0
    shards = ShardSet.open(tmp_path / "shards")
    tok = shards.tokenizer()
    first = np.asarray(shards.arrays("train")[0])[:12].tolist()
    assert tok.decode(first).startswith("<｜begin▁of▁sentence｜><｜User｜>What is")  # one bos: the shard frame
    out = tmp_path / "sft"
    assert main(["sft", f"init={deepseek_folder}", f"data.path={tmp_path / 'shards'}", f"out_dir={out}", "steps=6",
                 "batch_size=4", "data.seq_len=32", "optim.lr=3e-3", "optim.warmup_steps=0", "eval_every=6", "log_every=1",
                 "eval_batches=1", "ckpt_every=6", "mtp_lambda=0", "--quiet"]) == 0
    losses = [r["main"] for r in map(json.loads, open(out / "metrics.jsonl")) if "main" in r]
    assert len(losses) == 6 and losses[-1] < losses[0]
    from nanoseek.hf import load_pretrained

    pre = load_pretrained(out)
    assert pre.tokenizer.template.source == tok.template.source and pre.tokenizer.stop_ids == tok.stop_ids
