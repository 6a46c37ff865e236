"""Scale out: torchrun with FSDP2 data parallelism and expert parallelism (parallel.py, ep.py), and
sharded checkpoints through torch.distributed.checkpoint (checkpoint.py). Applied to the model from
outside: nanoseek.model knows nothing of distribution."""


class DistError(RuntimeError):
    """A distributed job cannot go on: a rank died, a collective timed out, or the layout is wrong."""
