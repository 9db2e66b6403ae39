"""Sequence and CFG parallelism on torch.distributed (DESIGN 7). Knows nothing of Wan's internals
beyond the three hooks in engine.py."""

from .dims import ParallelDims, destroy_parallel, init_parallel
from .engine import SequenceParallel, parallelize

__all__ = ["ParallelDims", "init_parallel", "destroy_parallel", "SequenceParallel", "parallelize"]
