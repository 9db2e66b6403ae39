"""The attention processor FreeLOC installs on each Wan self-attention layer.

It computes q, k, v exactly as diffusers' WanAttnProcessor does, then hands them with the layer's
plan to an attention function; when the plan is stock (kind full, or F <= T) it defers to the stock
processor so the output is diffusers' own. It holds no rank logic: sequence parallelism, when
installed, replaces `state.attention` with a distributed function of the same signature.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from .plan import LayerPlan, layer_plan


class FreeLOCState:
    """Shared by all processors of one transformer: profile, grid of the current forward, attention fn."""

    def __init__(self, profile, t_rope, attention):
        self.profile = profile
        self.t_rope = t_rope
        self.attention = attention  # (q, k, v, rotary_emb, plan, t_rope) -> out, all [B, L, h, d]
        self.grid: tuple[int, int, int] | None = None
        self.route_stock = False  # True under sequence parallelism: stock layers need all frames too

    def plan(self, kind: str) -> LayerPlan:
        if self.grid is None:
            raise RuntimeError("FreeLOC: token grid unknown; call the transformer, not a block, directly")
        p = self.profile
        return layer_plan(kind, self.grid, p.trained_frames, p.vrpr, p.tsa)


class FreeLOCAttnProcessor:
    def __init__(self, kind: str, state: FreeLOCState):
        self.kind = kind
        self.state = state
        self.stock = WanAttnProcessor()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or rotary_emb is None or attention_mask is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        plan = self.state.plan(self.kind)
        if plan.is_stock and not self.state.route_stock:
            return self.stock(attn, hidden_states, None, None, rotary_emb)
        q, k, v = project_qkv(attn, hidden_states)
        return project_out(attn, self.state.attention(q, k, v, rotary_emb, plan, self.state.t_rope), q.dtype)


def project_qkv(attn, hidden_states: torch.Tensor):
    """Wan self-attention's q, k, v [B, L, h, d] (q and k normalised, not yet rotated), as WanAttnProcessor."""
    if getattr(attn, "fused_projections", False):
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
    k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
    return q, k, v.unflatten(2, (attn.heads, -1))


def project_out(attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output projection of attention out [B, L, h, d]."""
    return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(dtype)))


def grid_of(transformer, hidden_states: torch.Tensor) -> tuple[int, int, int]:
    """(F, H, W) after patching, from the transformer input [B, C, F, H, W]."""
    p_t, p_h, p_w = transformer.config.patch_size
    _, _, f, h, w = hidden_states.shape
    return f // p_t, h // p_h, w // p_w
