"""Counting what a FreeLOC layer asks of the device: fused attention kernel calls and other aten ops.

On a GPU every call is a launch plus Python dispatch, so at long lengths a layer can be bound by the host
rather than by its kernels. `count_calls` runs a function under a dispatch mode that counts every aten op it
reaches, the fused attention kernels apart (with `stub_fused` the fused kernels return zeros at once).
`stubbed_kernels` stubs the CPU flash kernel behind lse.attend without a dispatch mode (whose Python hook
costs more than many ops), so a timed run is the host's share plus the small work of the other ops. Used by
bench/kernel_calls.py, bench/gpu_check.py and the tests that keep a layer's call count bounded. (The meta
device is no substitute: sdpa would batch as for the matmul path, and ops such as logaddexp run as slow
Python references there.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import lse

_FUSED_NAMES = (
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
FUSED = frozenset(getattr(torch.ops.aten, name) for name in _FUSED_NAMES if hasattr(torch.ops.aten, name))
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclasses.dataclass
class Calls:
    """fused: fused attention kernel calls; other: every other aten op; seconds: wall time of the run."""

    fused: int = 0
    other: int = 0
    seconds: float = 0.0


class _Counter(TorchDispatchMode):
    def __init__(self, calls: Calls, stub_fused: bool):
        super().__init__()
        self.calls, self.stub_fused = calls, stub_fused

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket not in FUSED:
            self.calls.other += 1
            return func(*args, **(kwargs or {}))
        self.calls.fused += 1
        if self.stub_fused:
            if func.overloadpacket is not _CPU_FLASH:
                raise NotImplementedError(f"count_calls(stub_fused=True): no stub for {func}")
            return _zeros_like_attention(args[0], args[2])
        return func(*args, **(kwargs or {}))


def _zeros_like_attention(q, v):
    """(out, lse) of the right shapes: zeros [..., Lq, dv] and float32 zeros [..., Lq]."""
    return q.new_zeros(*q.shape[:-1], v.shape[-1]), q.new_zeros(q.shape[:-1], dtype=torch.float32)


def count_calls(fn, *args, stub_fused: bool = False, **kwargs) -> tuple[Calls, object]:
    """(Calls, fn's result) of one run of fn(*args, **kwargs); stub_fused: the CPU flash kernel returns zeros."""
    calls = Calls()
    t0 = time.perf_counter()
    with _Counter(calls, stub_fused):
        result = fn(*args, **kwargs)
    calls.seconds = time.perf_counter() - t0
    return calls, result


@contextlib.contextmanager
def stubbed_kernels():
    """Within: lse.attend's CPU flash kernel returns zeros at once (no attention is computed)."""
    real = lse._RUN["cpu-flash"]
    lse._RUN["cpu-flash"] = lambda q, k, v, bias, scale: _zeros_like_attention(q, v)
    try:
        yield
    finally:
        lse._RUN["cpu-flash"] = real
