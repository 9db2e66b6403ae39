"""Attention backends for FreeLOC layers, chosen by name from a small registry.

Every backend computes the same thing (DESIGN 6) from un-rotated q, k, v [B, L, h, d], Wan's
rotary tables and a LayerPlan, and returns [B, L, h, d]. `reference` is the oracle all others match.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ..choices import ATTENTION_BACKENDS
from ..plan import LayerPlan
from ..rope import TemporalRope, apply_rotary, split_rotations
from .flex import flex_freeloc_attention
from .reference import reference_attention
from .sdpa import grouped_attention


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    run: Callable  # (q, k, v, rotary_emb, plan, t_rope) -> out
    description: str


def _stock(q, k, v, rotary_emb):
    """Stock Wan attention (natural RoPE, all keys), for stock plans reached through parallel paths."""
    q, k = (apply_rotary(x, *rotary_emb).transpose(1, 2) for x in (q, k))
    return torch.nn.functional.scaled_dot_product_attention(q, k, v.transpose(1, 2)).transpose(1, 2)


def _sdpa(impl):
    def run(q, k, v, rotary_emb, plan: LayerPlan, t_rope: TemporalRope):
        if plan.is_stock:
            return _stock(q, k, v, rotary_emb)
        frames = torch.arange(plan.num_frames).repeat_interleave(plan.tokens_per_frame)
        q_nat, k_nat, q0, k0 = (x.transpose(1, 2) for x in split_rotations(q, k, rotary_emb, t_rope, frames))
        out, _ = grouped_attention(q_nat, k_nat, q0, k0, v.transpose(1, 2), plan, t_rope, impl=impl)
        return out.transpose(1, 2)

    return run


def _flex(q, k, v, rotary_emb, plan, t_rope):
    if plan.is_stock:
        return _stock(q, k, v, rotary_emb)
    q0, k0 = (x.transpose(1, 2) for x in split_rotations(q, k, rotary_emb, t_rope)[2:])
    return flex_freeloc_attention(q0, k0, v.transpose(1, 2), plan, t_rope).transpose(1, 2)


def _reference(q, k, v, rotary_emb, plan, t_rope):
    q0, k0 = (x.transpose(1, 2) for x in split_rotations(q, k, rotary_emb, t_rope)[2:])
    return reference_attention(q0, k0, v.transpose(1, 2), plan, t_rope).to(q.dtype).transpose(1, 2)


BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend("sdpa", _sdpa("auto"),
                "grouped softmax + lse merge; fused lse kernels on CPU and CUDA (lse.kernel_for), matmul elsewhere"),
        Backend("sdpa-math", _sdpa("math"), "grouped softmax + lse merge, plain matmul on any device"),
        Backend("flex", _flex, "torch flex_attention, compiled, block masks from the plan (the CUDA path)"),
        Backend("reference", _reference, "materialised L x L scores in float64; tests only"),
    )
}


assert set(ATTENTION_BACKENDS) <= set(BACKENDS), "freeloc_dist.choices names a backend the registry lacks"


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
