"""TokenLoader: fixed-length training windows from a split's packed token stream, resumable exactly.

The stream is the split's shards concatenated: `doc eos doc eos ...` (documents are packed, never padded).
A window is seq_len + 1 consecutive tokens; x = window[:-1], y = window[1:]. In epoch e the windows start
at o_e + i * seq_len for i < n_windows = (T - seq_len) // seq_len, with a random offset o_e in [0, seq_len)
(so window edges move between epochs) and their order a permutation; both come from
numpy.random.default_rng((seed, e)). Consecutive windows overlap by one token, so every (token, next
token) pair of the epoch's span is a target exactly once.

Ranks take the permutation's entries rank, rank + W, ... (disjoint), truncated to the same count on every
rank; a batch is the next batch_size of them. The last partial batch of an epoch is dropped (those windows
come back, elsewhere, in later epochs). The position is (epoch, cursor = batches served in that epoch), so
`load_state_dict(state_dict())` resumes on the exact next batch.

loss_on="assistant" (SFT): targets outside assistant turns are -100 (ignored by the loss). A target counts
iff the last marker before it among <|assistant|>, <|user|>, <|begin_of_text|>, <|end_of_text|> is
<|assistant|>: the reply and its closing end-of-text are learned, prompts and user turns are not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.shards import ShardSet


LOSS_ON = ("all", "assistant")


def assistant_targets(tokens: np.ndarray, assistant: int, others: tuple[int, ...], inside: bool = False
                      ) -> tuple[np.ndarray, bool]:
    """mask[k] = whether tokens[k] lies in an assistant turn (the last marker before k is `assistant`);
    `inside` is that state before tokens[0]. Returns the mask and the state after the last token."""
    kind = np.zeros(len(tokens), dtype=np.int8)  # 1 assistant, 2 another marker
    kind[np.isin(tokens, others)] = 2
    kind[tokens == assistant] = 1
    last = np.maximum.accumulate(np.where(kind > 0, np.arange(len(tokens)), -1))
    state = np.where(last >= 0, kind[np.maximum(last, 0)] == 1, inside)  # after token k
    mask = np.concatenate([[inside], state[:-1]]) if len(tokens) else state
    return mask.astype(bool), bool(state[-1]) if len(tokens) else inside


class TokenLoader:
    def __init__(self, shard_dir: str | Path, split: str = "train", batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, rank: int = 0, world_size: int = 1, loss_on: str = "all"):
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r} must be one of {LOSS_ON}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.shards = ShardSet.open(shard_dir)
        self.split, self.batch_size, self.seq_len = split, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_tokens = self.shards.num_tokens(split)
        self.n_windows = max((self.num_tokens - seq_len) // seq_len, 0)
        self.batches_per_epoch = self.n_windows // world_size // batch_size
        # tokens (inputs) seen per epoch across all ranks
        self.tokens_per_epoch = self.batches_per_epoch * batch_size * seq_len * world_size
        self.epoch, self.cursor = 0, 0
        self._starts: np.ndarray | None = None  # this rank's window starts for self.epoch
        self._mask = self._assistant_mask() if loss_on == "assistant" else None

    def _assistant_mask(self) -> np.ndarray:
        """The split's stream-long target mask (one byte per token), built once."""
        tok = self.shards.tokenizer()
        user, assistant = tok.chat_markers
        if assistant is None:
            raise ValueError(f"the chat template of {tok.path} opens assistant turns with no single special token, "
                             "so loss_on='assistant' cannot find them; use loss_on='all'")
        others = tuple(i for i in (user, tok.bos_id, tok.eos_id) if i is not None)
        parts, inside = [], False
        for array in self.shards.arrays(self.split):
            mask, inside = assistant_targets(np.asarray(array), assistant, others, inside)
            parts.append(mask)
        mask = np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
        if not mask.any():
            raise ValueError(f"split {self.split!r} of {self.shards.root} has no assistant turns "
                             f"({tok.id_to_token(assistant)}): loss_on='assistant' needs chat-formatted documents")
        return mask

    # ------------------------------------------------------------------ training iteration
    def _epoch_starts(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, epoch))
        offset = int(rng.integers(self.seq_len))
        order = rng.permutation(self.n_windows)
        per_rank = self.batches_per_epoch * self.batch_size
        return offset + order[self.rank::self.world_size][:per_rank] * self.seq_len

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), int64 tensors of shape (batch_size, seq_len), y[:, t] = x[:, t + 1] in the stream."""
        if self.batches_per_epoch == 0:
            raise ValueError(f"split {self.split!r} of {self.shards.root} has {self.num_tokens} tokens, fewer than "
                             f"one batch needs (batch_size {self.batch_size} x world_size {self.world_size} "
                             f"windows of seq_len {self.seq_len}, plus seq_len)")
        if self.cursor == self.batches_per_epoch:
            self.epoch, self.cursor, self._starts = self.epoch + 1, 0, None
        if self._starts is None:
            self._starts = self._epoch_starts(self.epoch)
        b = self.batch_size
        starts = self._starts[self.cursor * b:(self.cursor + 1) * b]
        self.cursor += 1
        return self._windows(starts)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def _windows(self, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.seq_len
        w = np.stack([self.shards.read(self.split, int(s), int(s) + L + 1) for s in starts]).astype(np.int64)
        w = torch.from_numpy(w)  # (b, L + 1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].clone()  # (a 1-row slice is already contiguous: no aliasing)
        if self._mask is not None:
            keep = np.stack([self._mask[int(s) + 1:int(s) + L + 1] for s in starts])
            y[~torch.from_numpy(keep)] = -100
        return x, y

    # ------------------------------------------------------------------ evaluation
    def val_batches(self, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed pass for evaluation: windows at 0, L, 2L, ... in order (this rank's share), the last batch
        possibly smaller; at most max_batches. Does not touch the training position."""
        n = (self.num_tokens - 1) // self.seq_len
        if n < 1:
            raise ValueError(f"split {self.split!r} of {self.shards.root} has {self.num_tokens} tokens, fewer than "
                             f"one window of seq_len {self.seq_len} + 1")
        starts = np.arange(self.rank, n, self.world_size) * self.seq_len
        for k, i in enumerate(range(0, len(starts), self.batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            yield self._windows(starts[i:i + self.batch_size])

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """JSON-serializable position plus the settings it is only valid for."""
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "split": self.split,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "world_size": self.world_size,
                "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        """The position is the same for every rank and depends only on the global batch (batch_size x
        world_size): the first c batches of W ranks are the first c global batches, whatever W."""
        for key in ("seed", "split", "seq_len", "num_tokens"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}; "
                                 f"resume needs the same data and batch layout")
        saved = state.get("batch_size", self.batch_size) * state.get("world_size", self.world_size)
        if saved != self.batch_size * self.world_size:
            raise ValueError(f"loader state has a global batch of {saved} rows but this loader reads "
                             f"{self.batch_size} x {self.world_size} ranks; resume needs the same global batch")
        if not 0 <= state["cursor"] <= self.batches_per_epoch:
            raise ValueError(f"loader state cursor={state['cursor']} is outside [0, {self.batches_per_epoch}]")
        self.epoch, self.cursor, self._starts = int(state["epoch"]), int(state["cursor"]), None
