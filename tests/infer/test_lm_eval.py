"""lm-evaluation-harness against the live server, offline: lm_eval's `local-completions` model with its remote
tokenizer (the server's /tokenizer_info, /tokenize, /detokenize) runs the two tiny local tasks in
tests/infer/lm_eval_task/, and its per-sample results must be nanoseek's own:

- nanoseek_arith (multiple_choice): lm-eval sends the token ids of context + continuation with `echo`,
  `logprobs: 1`, `max_tokens: 1` and sums `token_logprobs[ctxlen:-1]`; that is the full forward's
  float32 log_softmax summed over the continuation tokens (is_greedy: every continuation token is the argmax).
- nanoseek_qa (generate_until): lm-eval sends the prompt's token ids (no bos) with `stop` = until + the eos
  string; the text is nanoseek's greedy decoding of those ids, cut before the first stop string.

The tasks read local JSONL files only and the test fails on any connection beyond this machine.
"""

import socket
from pathlib import Path

import lm_eval  # lm-eval[api] is a test dependency (pyproject.toml): a missing one fails, never skips
import lm_eval.models.api_models as api_models
import pytest
import torch
import yaml
from lm_eval.tasks import TaskManager

from nanoseek.infer.engine import generate
from nanoseek.infer.sampling import SamplingParams
from tests.conftest import tiny_model
from tests.infer.conftest import NAME, live_server

pytestmark = pytest.mark.slow

TASK_DIR = Path(__file__).parent / "lm_eval_task"
TASKS = ["nanoseek_arith", "nanoseek_qa"]
OFFLINE = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
LOCAL = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture(scope="module")
def url(tokenizer):
    with live_server(tiny_model(vocab_size=tokenizer.vocab_size), tokenizer, max_batch=4, max_concurrent=8) as s:
        yield s[0]


@pytest.fixture(scope="module")
def reference(tokenizer):
    """The same model (tiny_model is seeded), a separate instance: the server's thread uses its own."""
    return tiny_model(vocab_size=tokenizer.vocab_size)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network: the Hugging Face offline switches (also where datasets already read them at import), and
    any connection or name lookup beyond this machine fails. Returns a fresh datasets cache folder."""
    for var in OFFLINE:
        monkeypatch.setenv(var, "1")
    import datasets.config
    for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, attr):
            monkeypatch.setattr(datasets.config, attr, True)

    def guard(host):
        if host not in LOCAL:
            raise OSError(f"test_lm_eval is offline: no connection to {host!r}")

    lookup, connect = socket.getaddrinfo, socket.socket.connect

    def guarded_lookup(host, *args, **kwargs):
        guard(host)
        return lookup(host, *args, **kwargs)

    def guarded_connect(sock, address):
        if isinstance(address, tuple):
            guard(address[0])
        return connect(sock, address)

    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    return tmp_path / "hf_datasets"


def write_tasks(out: Path, cache_dir: Path) -> Path:
    """The task YAMLs with their data_files made absolute (lm-eval passes them to datasets.load_dataset,
    which would resolve a relative path against the current directory) and a private datasets cache."""
    out.mkdir()
    for src in TASK_DIR.glob("*.yaml"):
        cfg = yaml.safe_load(src.read_text())
        kwargs = cfg["dataset_kwargs"]
        kwargs["data_files"] = {split: str(TASK_DIR / f) for split, f in kwargs["data_files"].items()}
        kwargs["cache_dir"] = str(cache_dir)
        (out / src.name).write_text(yaml.safe_dump(cfg))
    return out


@pytest.fixture
def sent(monkeypatch):
    """The JSON bodies lm-eval posts to /v1/completions (local-completions posts with requests.post)."""
    bodies, post = [], api_models.requests.post

    def record(*args, **kwargs):
        bodies.append(kwargs["json"])
        return post(*args, **kwargs)

    monkeypatch.setattr(api_models.requests, "post", record)
    return bodies


def evaluate(url: str, task_dir: Path, batch_size: int) -> dict:
    return lm_eval.simple_evaluate(
        model="local-completions",
        model_args=dict(model=NAME, base_url=f"{url}/v1/completions", tokenizer_backend="remote",
                        tokenized_requests=True, num_concurrent=1, max_retries=1, batch_size=batch_size),
        tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        log_samples=True, bootstrap_iters=0)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split (TemplateLM._encode_pair): trailing spaces move to the continuation, the whole string
    is encoded and the context's tokens cut off (no bos: lm-eval asks /tokenize for no special tokens)."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def loglikelihood(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context + continuation])
    logp = model(ids).logits[0].float().log_softmax(-1)[len(context) - 1:-1]
    target = torch.tensor(continuation)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def greedy_text(model, tokenizer, prompt: list[int], max_tokens: int, stop: list[str]) -> str:
    """nanoseek's greedy decoding (ends at eos or max_tokens), cut before the first stop string."""
    ids = generate(model, [prompt], SamplingParams(max_tokens=max_tokens), stop_ids=(tokenizer.eos_id,))[0]
    text = tokenizer.decode(ids)
    return text[:min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_lm_eval_matches_nanoseek(url, tokenizer, reference, offline, sent, tmp_path, batch_size):
    out = evaluate(url, write_tasks(tmp_path / "tasks", offline), batch_size)
    samples = out["samples"]
    eos = tokenizer.decode([tokenizer.eos_id])

    # log-likelihoods: one (context, " choice") request per choice, each answered (loglikelihood, is_greedy)
    arith = samples["nanoseek_arith"]
    assert len(arith) == 6
    for s in arith:
        got = [r[0] for r in s["resps"]]
        assert [tuple(r) for r in s["filtered_resps"]] == [tuple(r) for r in got]
        want = [loglikelihood(reference, *encode_pair(tokenizer, *args)) for args in s["arguments"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4, rel=0), s["arguments"]
        assert [bool(g[1]) for g in got] == [w[1] for w in want], s["arguments"]
        assert s["acc"] == float(max(range(len(want)), key=lambda i: want[i][0]) == s["target"])
    scored = [p for p in sent if p.get("echo")]
    assert scored and all(p["max_tokens"] == 1 and p["logprobs"] == 1 and p["temperature"] == 0 for p in scored)

    # generations: greedy, at most max_gen_toks tokens, cut before the first "until" string or the eos string
    qa = samples["nanoseek_qa"]
    assert len(qa) == 6
    until = ["\n", ".", "\t"]
    cut = []
    for s in qa:
        (context, kw), = s["arguments"]
        assert kw["until"] == until and not kw["do_sample"]
        prompt = tokenizer.encode(context)
        want = greedy_text(reference, tokenizer, prompt, kw["max_gen_toks"], [*until, eos])
        assert s["resps"] == [[want]] and s["filtered_resps"] == [want], context
        cut.append(want != greedy_text(reference, tokenizer, prompt, kw["max_gen_toks"], []))
    assert any(cut) and not all(cut), f"the stop strings should cut some answers, not all: {cut}"
    generated = [p for p in sent if not p.get("echo")]
    assert len(generated) == -(-6 // batch_size) and all(p["stop"] == [*until, eos] for p in generated)
    # token-id prompts only, up to batch_size of them per request
    assert all(isinstance(p["prompt"], list) and all(isinstance(x, list) for x in p["prompt"]) for p in sent)
    assert max(len(p["prompt"]) for p in sent) == batch_size
