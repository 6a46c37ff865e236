"""Large CPU buffers kept from one training step to the next.

glibc hands blocks above its mmap threshold (32 MiB at most) back to the kernel when they are freed, and the
CPU allocator of PyTorch caches nothing, so a tensor that size allocated every step is fresh memory every step:
each page faults on its first touch. Here that costs ~16 ms per 64 MiB with 4 KiB pages, and up to ~300 ms
with transparent huge pages (THP_MEM_ALLOC_ENABLE=1: the kernel compacts memory on the fault), so the head and
embedding gradients of a 49k x 768 vocabulary and the expert gradients of its MoE layers cost 0.6 s of a 3.6 s
step (docs/LOG.md, sessions 8-9). A `Workspace` keeps one allocation and lends it out:

- `scratch`: memory for a temporary that does not outlive the call (the head's chunk of logits);
- `grad`: memory for a weight's gradient, returned from a backward as a fresh alias of the buffer. Autograd
  adopts it as `param.grad` when the parameter has none (the usual step: `zero_grad(set_to_none=True)` before
  the backward), or adds it into the gradient already there. A buffer that `param.grad` still is (gradient
  accumulation over micro-batches) is not lent again: a second one is, so a held gradient is never overwritten.
  The one hazard: a reference to an old `.grad` kept past `zero_grad(set_to_none=True)` sees the next step's.

Only on CPU: CUDA's caching allocator already reuses its blocks, and there a plain `torch.empty` is returned.
"""

from __future__ import annotations

import torch


class Workspace:
    def __init__(self):
        self._scratch: torch.Tensor | None = None
        self._grads: list[torch.Tensor] = []  # at most two: the one param.grad holds and the next

    def __deepcopy__(self, memo) -> Workspace:
        return Workspace()  # a copied model (GRPO's reference) gets its own memory when it needs some

    def scratch(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Uninitialised (shape) memory, the same each call while the shape holds (CPU)."""
        b = self._scratch
        if torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        if b is None or b.shape != torch.Size(shape) or b.dtype != dtype or b.device != torch.device(device):
            self._scratch = b = torch.empty(shape, dtype=dtype, device=device)
        return b

    def grad(self, param: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Uninitialised memory shaped like `param` for its gradient (see the module's docstring)."""
        dtype = dtype or param.dtype
        if param.device.type != "cpu":
            return torch.empty(param.shape, dtype=dtype, device=param.device)
        held = param.grad.untyped_storage().data_ptr() if param.grad is not None else None
        self._grads = [b for b in self._grads if b.shape == param.shape and b.dtype == dtype]
        free = [b for b in self._grads if b.untyped_storage().data_ptr() != held]
        if not free:
            free = [torch.empty(param.shape, dtype=dtype, device=param.device)]
            self._grads = (self._grads + free)[-2:]
        return free[0].view(param.shape)  # a new tensor object: autograd may adopt it as param.grad
