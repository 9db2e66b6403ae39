"""Sequence and CFG parallelism on torch.distributed (DESIGN 7). Knows nothing of Wan's internals
beyond the three hooks in engine.py, and nothing of the sampler.

Imports are lazy so that the pure planning modules (decisions, shards) load without diffusers."""

__all__ = ["ParallelDims", "init_parallel", "destroy_parallel", "exit_process", "SequenceParallel", "parallelize"]


def __getattr__(name):
    if name in ("ParallelDims", "init_parallel", "destroy_parallel"):
        from . import dims

        return getattr(dims, name)
    if name == "exit_process":
        from .exit import exit_process

        return exit_process
    if name in ("SequenceParallel", "parallelize"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'freeloc_dist.parallel' has no attribute {name!r}")
