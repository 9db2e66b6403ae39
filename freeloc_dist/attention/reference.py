"""The oracle: a materialised score matrix with each pair's own temporal offset (small grids only)."""

from __future__ import annotations

import torch

from ..plan import LayerPlan, expand_to_tokens
from ..rope import TemporalRope


def reference_attention(q0, k0, v, plan: LayerPlan, t_rope: TemporalRope, dtype=torch.float64):
    """q0, k0: spatially rotated, temporal position 0, [B, h, L, d]; v [B, h, L, d] -> [B, h, L, d].

    score[i, j] = <rot_t(q0_i, offset[i, j]), k0_j> / sqrt(d), masked by the plan, one softmax.
    """
    mask, offset = expand_to_tokens(plan)
    q0, k0, v = q0.to(dtype), k0.to(dtype), v.to(dtype)
    scores = torch.full(q0.shape[:-1] + (k0.shape[-2],), float("-inf"), dtype=dtype)
    for o in offset.unique().tolist():
        s_o = torch.matmul(t_rope.rotate(q0, o), k0.transpose(-1, -2)) * q0.shape[-1] ** -0.5
        scores = torch.where(offset == o, s_o, scores)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)
