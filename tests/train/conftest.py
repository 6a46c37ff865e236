import pytest

from nanoseek.train.config import load_train_config


@pytest.fixture
def make_cfg(tmp_path, shard_dir):
    def make(*overrides, out="run"):
        return load_train_config(None, ["preset=tiny", f"data.path={shard_dir}", f"out_dir={tmp_path / out}",
                                        "steps=8", "batch_size=4", "data.seq_len=64", "log_every=1",
                                        "eval_every=4", "eval_batches=2", "ckpt_every=4", "optim.warmup_steps=2",
                                        *overrides])
    return make
