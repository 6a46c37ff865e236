"""nanoseek: the DeepSeek-V3 / R1 recipe in compact, verified PyTorch."""

import os

# Transparent huge pages for torch's large CPU allocations (2 MiB pages, read by torch when it loads, so only
# where nanoseek is imported first): decoding streams every weight once per token, and 4 KiB pages cost it
# ~10% in TLB misses here (docs/LOG.md, session 4). THP_MEM_ALLOC_ENABLE=0 turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.model import Transformer  # noqa: E402

__all__ = ["ModelConfig", "Transformer"]
__version__ = "0.1.0"
