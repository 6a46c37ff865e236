import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from nanoseek.hf import load_pretrained


def logits(model, ids=((0, 7, 8, 9, 10, 11),)):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_run_and_checkpoint_directories_load_the_trained_weights(tiny_run):
    run, model = tiny_run
    for path in (run, run / "checkpoints" / "step_000004"):
        pre = load_pretrained(path)
        assert pre.name == "tiny" and pre.weights.name == "step_000004"
        assert pre.tokenizer is not None and pre.tokenizer.vocab_size <= pre.model.config.vocab_size
        torch.testing.assert_close(logits(pre.model), logits(model), rtol=0, atol=0)


@pytest.mark.parametrize("sharded", [False, True])
def test_hugging_face_directory(tiny_run, tmp_path, sharded):
    run, model = tiny_run
    sd = {k: v.clone() for k, v in model.hf_state_dict().items()}
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf_dict()))
    shutil.copy(run / "tokenizer.json", tmp_path)
    if sharded:
        keys = sorted(sd)
        parts = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, ks in parts.items():
            save_file({k: sd[k] for k in ks}, tmp_path / name)
        index = {"weight_map": {k: name for name, ks in parts.items() for k in ks}}
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file(sd, tmp_path / "model.safetensors")
    torch.testing.assert_close(logits(load_pretrained(tmp_path).model), logits(model), rtol=0, atol=0)


def test_bad_directories_say_what_is_wrong(tiny_run, tmp_path):
    run, _ = tiny_run
    with pytest.raises(ValueError, match="is not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no config.json"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither a 'model' table"):
        load_pretrained(tmp_path)
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    shutil.copy(run / "config.json", empty_run)
    with pytest.raises(ValueError, match="holds no checkpoint yet"):
        load_pretrained(empty_run)
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    (broken / "checkpoints" / "step_000004" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_pretrained(broken)
