"""Data: tokenizer, token shards, the resumable loader, and the generated verifiable tasks.

Knows no model (the import rule of docs/style.md): tensors leave the loader as int64 token ids.
"""

from nanoseek.data.builtin import ensure_builtin_data
from nanoseek.data.loader import TokenLoader
from nanoseek.data.shards import ShardSet, prepare
from nanoseek.data.tokenizer import Tokenizer

__all__ = ["Tokenizer", "prepare", "ShardSet", "TokenLoader", "ensure_builtin_data"]
