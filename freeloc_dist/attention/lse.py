"""Softmax attention that also returns log-sum-exp, and the exact merge of partial results.

Shapes: q [B, h, Lq, d], k/v [B, h, Lk, d], out [B, h, Lq, d], lse Float32[B, h, Lq].
"""

from __future__ import annotations

import torch

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def attend_math(q, k, v, bias=None, scale=None):
    """Plain matmul attention with lse; device-agnostic, used off-CPU and as a cross-check on CPU."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return torch.matmul(p, v.float()).to(q.dtype), lse


def uses_flash(impl: str, device) -> bool:
    """Whether `attend` runs the fused CPU flash kernel (else the matmul path) for impl on device."""
    return impl == "flash" or (impl == "auto" and torch.device(device).type == "cpu" and _FLASH_CPU is not None)


def attend(q, k, v, bias=None, scale=None, impl: str = "auto"):
    """(out, lse) of softmax(q k^T * scale + bias) v. bias is additive (0 / -inf), [Lq, Lk].

    On CPU the fused flash kernel returns lse directly; elsewhere the matmul path runs (it is the
    same code the CPU suite runs with impl="math"). Every query row must attend at least one key.
    """
    if uses_flash(impl, q.device):
        out, lse = _FLASH_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out, lse.float()
    if impl in ("auto", "math"):
        return attend_math(q, k, v, bias, scale)
    raise ValueError(f"attention impl {impl!r}: must be auto, flash or math")


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
