"""Softmax attention that also returns log-sum-exp, and the exact merge of partial results.

Shapes: q [B, h, Lq, d], k/v [B, h, Lk, d], out [B, h, Lq, d], lse Float32[B, h, Lq].

Which kernel `attend` runs is decided in one place, `kernel_for`, from this table:

    device  dtype            mask (bias)  kernel
    cpu     any              any          cpu-flash       aten._scaled_dot_product_flash_attention_for_cpu
    cuda    fp16 / bf16      none         cuda-flash      aten._scaled_dot_product_flash_attention (sm80+)
    cuda    fp16/bf16/fp32   any          cuda-efficient  aten._scaled_dot_product_efficient_attention
    other, or float64 on cuda             math            attend_math: materialises the scores

The fused kernels never hold a score matrix, and each returns the log-sum-exp the merge needs, but
in its own layout; all three are natural-log (ln sum exp(s), s = q.k * scale) and float32, and are
normalised here to [B, h, Lq]:
  - cpu-flash:      lse [B, h, Lq] (a transposed view of a token-major buffer);
  - cuda-flash:     lse [B, h, Lq] (flash-attention 2's softmax_lse);
  - cuda-efficient: lse [B, h, ceil(Lq / 32) * 32], padded, so it is sliced to Lq; the additive bias
    must be 4-D [B, h, Lq, Lk] (stride 0 over B, h is fine) with contiguous keys and a row stride that
    is a multiple of 16 bytes, so a ragged bias is copied into a wider buffer and viewed back.
(The flash kernels exponentiate in base 2 internally, with scale * log2(e), but return natural-log lse.)
The signatures used (q, k, v positional, then dropout/causal flags; outputs 0 and 1) are the same in
torch 2.11 (the GPU machine) and 2.13 (here). The CUDA calls cannot run on this project's CPU-only
machines: tests/test_lse_dispatch.py runs this glue against stand-ins with the kernels' documented
conventions, and bench/gpu_check.py runs the real kernels when GPU time is lent.
"""

from __future__ import annotations

import functools

import torch

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_EFFICIENT_CUDA = getattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", None)

KERNELS = ("cpu-flash", "cuda-flash", "cuda-efficient", "math")
_HALF = (torch.float16, torch.bfloat16)
_BIAS_ALIGN = 16  # elements: covers the efficient kernel's 16 bytes for every dtype (torch's own sdpa pads to 16)


@functools.cache
def _cuda_flash_ok(index) -> bool:
    """Flash attention 2 needs compute capability 8.0 or newer."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def kernel_for(impl: str, device, dtype=None, masked: bool = False) -> str:
    """The kernel `attend` runs for impl ("auto", "flash" = the device's fused kernel, "math") on device.

    dtype None / masked False ask about the device alone (is a fused kernel used at all?)."""
    if impl not in ("auto", "flash", "math"):
        raise ValueError(f"attention impl {impl!r}: must be auto, flash or math")
    device = torch.device(device)
    kernel = "math"
    if impl != "math":
        if device.type == "cpu" and _FLASH_CPU is not None:
            kernel = "cpu-flash"
        elif device.type == "cuda" and dtype != torch.float64:
            flash = dtype in _HALF and not masked and _cuda_flash_ok(device.index)
            kernel = "cuda-flash" if flash or dtype is None else "cuda-efficient"
    if impl == "flash" and kernel == "math":
        raise ValueError(f"attention impl 'flash': no fused kernel for {device.type} {dtype}")
    return kernel


def uses_flash(impl: str, device) -> bool:
    """Whether `attend` runs a fused kernel (no score matrix) for impl on device; sizes batched calls."""
    return kernel_for(impl, device) != "math"


def attend_math(q, k, v, bias=None, scale=None):
    """Plain matmul attention with lse; device-agnostic, the fallback and a cross-check on CPU."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.float()).to(q.dtype), lse


def _cpu_flash(q, k, v, bias, scale):
    return _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)


def _cuda_flash(q, k, v, bias, scale):
    assert bias is None, "cuda-flash takes no mask"
    res = _FLASH_CUDA(q, k, v, 0.0, False, False, scale=scale)  # (out, lse, cum_q, cum_k, max_q, max_k, ...)
    return res[0], res[1]


def aligned_bias(bias: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """A 2-D additive bias [Lq, Lk] as the efficient kernel reads it: [batch, heads, Lq, Lk], stride 0
    over batch and heads, keys contiguous, rows a multiple of _BIAS_ALIGN elements apart."""
    if bias.dim() != 2:
        raise ValueError(f"bias: expected [Lq, Lk], got {tuple(bias.shape)}")
    rows, cols = bias.shape
    if bias.stride(-1) != 1 or bias.stride(-2) % _BIAS_ALIGN:
        wide = bias.new_empty(rows, -(-cols // _BIAS_ALIGN) * _BIAS_ALIGN)
        wide[:, :cols] = bias
        bias = wide[:, :cols]
    return bias.expand(batch, heads, rows, cols)


def _cuda_efficient(q, k, v, bias, scale):
    if bias is not None:
        bias = aligned_bias(bias.to(q.dtype), q.shape[0], q.shape[1])
    res = _EFFICIENT_CUDA(q, k, v, bias, True, 0.0, False, scale=scale)  # (out, lse padded to 32, seed, offset)
    return res[0], res[1][..., : q.shape[-2]]


_RUN = {"cpu-flash": _cpu_flash, "cuda-flash": _cuda_flash, "cuda-efficient": _cuda_efficient,
        "math": lambda q, k, v, bias, scale: attend_math(q, k, v, bias, scale)}


def attend(q, k, v, bias=None, scale=None, impl: str = "auto"):
    """(out, lse) of softmax(q k^T * scale + bias) v. bias is additive (0 / -inf), [Lq, Lk].

    The kernel comes from kernel_for (the table above); impl="math" forces the matmul path on any
    device (what the CPU suite runs beside the flash kernel). Every query row must attend a key.
    """
    out, lse = _RUN[kernel_for(impl, q.device, q.dtype, bias is not None)](q, k, v, bias, scale)
    return out, lse.float()


def merge_into(out_acc, lse_acc, out, lse):
    """Merge a partial (out, lse) into float32 accumulators in place (exact log-sum-exp weighting).

    Rows where both sides are empty (lse -inf) stay (0, -inf) instead of turning into NaN.
    """
    new_lse = torch.logaddexp(lse_acc, lse)
    safe = torch.where(torch.isinf(new_lse), torch.zeros_like(new_lse), new_lse)
    w_old = torch.exp(lse_acc - safe)[..., None]
    w_new = torch.exp(lse - safe)[..., None]
    out_acc.mul_(w_old).addcmul_(out.float(), w_new)
    lse_acc.copy_(new_lse)
