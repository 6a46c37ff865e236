"""The built-in corpus: reasoning-style math documents generated from the task registry, seeded.

`ensure_builtin_data(root)` builds, once per configuration, root/builtin-<hash>/ holding
    corpus.jsonl     the documents ({"text": ...}; `Problem.document`, see nanoseek.data.tasks)
    tokenizer.json   a byte-level BPE trained on them (index.json points to it)
    index.json, train_*.bin, val_*.bin   the shards (`prepare`, val split by document hash)
    builtin.json     the configuration
and returns that directory. Every document comes from a prompt of the "train" split, so the held-out
prompts (sha1 % 10 == 0; `heldout()` draws them) never appear in training data, nor in the val shards.

The mix (`BUILTIN_MIX`, weights per (task, difficulty)) leans on the easiest family: about 56% addition and
23% subtraction, mostly 2-3 digits, the rest split between linear equations, countdown and word problems,
each with a few harder levels, so a small model trained for a few CPU-minutes gets the format and the easy
held-out problems largely right while the harder ones leave room for RL (a group with no correct sample
gives GRPO no signal).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from nanoseek.data.tasks import TASKS, Problem, make_rng

CORPUS_VERSION = 2  # bump when generators or the document format change (it is part of the cache key)
BUILTIN_MIX: tuple[tuple[str, int, float], ...] = (
    ("add", 1, 5), ("add", 2, 24), ("add", 3, 16), ("add", 4, 3), ("add", 5, 1),
    ("sub", 1, 3), ("sub", 2, 10), ("sub", 3, 6), ("sub", 4, 1),
    ("linear", 1, 4), ("linear", 2, 2), ("linear", 3, 1),
    ("countdown", 2, 3), ("countdown", 3, 2), ("countdown", 4, 1),
    ("word", 1, 2), ("word", 2, 2), ("word", 3, 1),
)


# Addition and subtraction only, weighted to two digits: what a few CPU-minutes of pretraining learns well
# enough for RL to improve (the demo; docs/LOG.md has the calibration).
ARITHMETIC_MIX: tuple[tuple[str, int, float], ...] = (
    ("add", 1, 5), ("add", 2, 40), ("add", 3, 15), ("sub", 1, 3), ("sub", 2, 27), ("sub", 3, 10),
)
MIXES = {"full": BUILTIN_MIX, "arithmetic": ARITHMETIC_MIX}


def get_mix(name: str) -> tuple[tuple[str, int, float], ...]:
    if name not in MIXES:
        raise ValueError(f"builtin mix {name!r} is unknown; choose one of {sorted(MIXES)}")
    return MIXES[name]


def _task(name: str, p_err: float):
    return TASKS[name].with_options(p_err=p_err) if p_err and name in ("add", "sub") else TASKS[name]


def _apportion(n: int, weights: list[float]) -> list[int]:
    """Integer counts summing to n, proportional to weights (largest remainder)."""
    total = sum(weights)
    raw = [n * w / total for w in weights]
    counts = [int(r) for r in raw]
    for k in sorted(range(len(raw)), key=lambda k: counts[k] - raw[k])[: n - sum(counts)]:
        counts[k] += 1
    return counts


def generate_corpus(n_docs: int, seed: int = 0, p_err: float = 0.0, mix=BUILTIN_MIX,
                    progress: bool = False) -> list[Problem]:
    """n_docs training-split problems in the proportions of `mix`, shuffled (deterministic in seed)."""
    from tqdm import tqdm

    problems: list[Problem] = []
    counts = _apportion(n_docs, [w for *_, w in mix])
    with tqdm(total=n_docs, unit="doc", desc="generate", disable=not progress) as bar:
        for (name, level, _), count in zip(mix, counts):
            problems += _task(name, p_err).sample(count, "train", seed, level)
            bar.update(count)
    make_rng("builtin-shuffle", seed).shuffle(problems)
    return problems


def heldout(n: int, seed: int = 0, mix=BUILTIN_MIX) -> list[Problem]:
    """n distinct held-out problems in the corpus mix (a (task, level) whose held-out prompts run out,
    e.g. 1-digit addition with about 10, stops being drawn)."""
    rng = make_rng("builtin-heldout", seed)
    live = list(range(len(mix)))
    seen: set[str] = set()
    out: list[Problem] = []
    while len(out) < n:
        if not live:
            raise ValueError(f"only {len(out)} distinct held-out problems exist in this mix, {n} asked")
        k = rng.choices(live, [mix[j][2] for j in live])[0]
        name, level, _ = mix[k]
        for _ in range(500):
            p = TASKS[name].generate(rng, level)
            if p.split == "heldout" and p.prompt not in seen:
                seen.add(p.prompt)
                out.append(p)
                break
        else:
            live.remove(k)
    return out


def ensure_builtin_data(root: str | Path, vocab_size: int = 2048, seed: int = 0, n_train_docs: int = 60000, *,
                        p_err: float = 0.0, val_fraction: float = 0.02, mix=BUILTIN_MIX, progress: bool = True
                        ) -> Path:
    """Build (or find, cached by a hash of the configuration) the built-in corpus; return its shard dir.

    vocab_size bounds the tokenizer (the corpus offers far fewer merges, so the real vocabulary is
    smaller; read it from `ShardSet.open(dir).vocab_size`). p_err: imitation noise for add / sub.
    """
    from nanoseek.data.shards import INDEX, prepare
    from nanoseek.data.tokenizer import Tokenizer

    if n_train_docs < 1:
        raise ValueError(f"n_train_docs={n_train_docs} must be >= 1")
    config = {"version": CORPUS_VERSION, "vocab_size": vocab_size, "seed": seed, "n_train_docs": n_train_docs,
              "p_err": p_err, "val_fraction": val_fraction, "mix": [list(m) for m in mix]}
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(root)
    final = root / f"builtin-{key}"
    if (final / INDEX).is_file():
        return final
    tmp = root / f".builtin-{key}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        problems = generate_corpus(n_train_docs, seed, p_err, mix, progress=progress)
        with open(tmp / "corpus.jsonl", "w", encoding="utf-8") as f:
            for p in problems:
                f.write(json.dumps({"text": p.document}, ensure_ascii=False) + "\n")
        tok = Tokenizer.train(iter([p.document for p in problems[:20000]]), vocab_size, tmp)
        summary = prepare([tmp / "corpus.jsonl"], tok, tmp, val_fraction=val_fraction, seed=seed, progress=progress)
        summary.pop("out_dir")  # the temporary directory
        (tmp / "builtin.json").write_text(json.dumps({**config, "summary": summary}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first; its copy is identical
            if not (final / INDEX).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
