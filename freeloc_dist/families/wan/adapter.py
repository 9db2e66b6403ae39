"""WanFamily: the adapter (families/base.py) for diffusers' WanTransformer3DModel.

FreeLOC replaces each block's self-attention `attn1` (cross-attention `attn2`, text and CLIP image tokens, is
never touched); q, k, v are computed exactly as diffusers' WanAttnProcessor does; RoPE is WanRotaryPosEmbed's
(families/wan/rope.py).
"""

from __future__ import annotations

import torch

from ..base import Family
from . import rope as wan_rope


class WanFamily(Family):
    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)

    def owns(self, transformer) -> bool:
        from diffusers import WanTransformer3DModel

        return isinstance(transformer, WanTransformer3DModel)

    # -- attention surgery ------------------------------------------------------------------------------
    def attention_layers(self, transformer):
        return [block.attn1 for block in transformer.blocks]

    def stock_processor(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanAttnProcessor()

    def freeloc_rotary(self, args, kwargs):
        # WanAttnProcessor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb): self-attention
        # without a mask, with RoPE, is FreeLOC's; anything else (cross-attention) is the stock processor's.
        names = ("encoder_hidden_states", "attention_mask", "rotary_emb")
        bound = dict(zip(names, args)) | kwargs
        if bound.get("encoder_hidden_states") is not None or bound.get("attention_mask") is not None:
            return None
        return bound.get("rotary_emb")

    def project_qkv(self, attn, hidden_states):
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        return q, k, v.unflatten(2, (attn.heads, -1))

    def project_out(self, attn, out, dtype):
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(dtype)))

    def grid_of(self, transformer, hidden_states):
        p_t, p_h, p_w = transformer.config.patch_size
        _, _, f, h, w = hidden_states.shape
        return f // p_t, h // p_h, w // p_w

    # -- RoPE ---------------------------------------------------------------------------------------------
    def temporal_rope(self, transformer):
        return wan_rope.temporal_rope_of(transformer)

    def rope_module(self, transformer) -> torch.nn.Module:
        return transformer.rope

    def global_rope(self, transformer, num_frames, height, width):
        return wan_rope.global_rope(transformer, num_frames, height, width)

    def grow_rope(self, transformer, num_frames):
        return wan_rope.grow_rope_tables(transformer.rope, num_frames)

    def set_temporal_frequency(self, transformer, index, omega):
        return wan_rope.set_temporal_frequency(transformer, index, omega)
