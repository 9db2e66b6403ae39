"""The adapter one model family implements (DESIGN 11): how FreeLOC, the engine and probing reach into its
transformer. Methods take the built diffusers transformer (or one of its attention modules); none holds rank
logic. Tensor shapes: B batch, L tokens (frame-major), h heads, d head channels, F/H/W the token grid.
"""

from __future__ import annotations

from typing import Any

import torch

from ..rope import TemporalRope


class Family:
    name: str = ""
    transformer_classes: tuple[str, ...] = ()  # class names this family serves, for error messages

    def __deepcopy__(self, memo):
        return self  # stateless: a copied model keeps the one registered adapter

    def owns(self, transformer) -> bool:
        """True if `transformer` is one of this family's models."""
        raise NotImplementedError

    # -- attention surgery ------------------------------------------------------------------------------
    def attention_layers(self, transformer) -> list[Any]:
        """The attention modules FreeLOC replaces, in forward order (the profile's layer index)."""
        raise NotImplementedError

    def stock_processor(self):
        """A new stock processor of this family's attention (what FreeLOC defers to on stock plans)."""
        raise NotImplementedError

    def freeloc_rotary(self, args: tuple, kwargs: dict):
        """The RoPE (cos, sin) of a processor call (its arguments after `attn, hidden_states`) that FreeLOC
        computes, or None when the call is one it leaves to the stock processor."""
        raise NotImplementedError

    def project_qkv(self, attn, hidden_states: torch.Tensor):
        """q, k, v [B, L, h, d] of one attention call: normalised as the stock processor does, not yet rotated."""
        raise NotImplementedError

    def project_out(self, attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The output projection of attention out [B, L, h, d]."""
        raise NotImplementedError

    def num_heads(self, transformer) -> int:
        return self.attention_layers(transformer)[0].heads

    def grid_of(self, transformer, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """(F, H, W) after patching, from the transformer input [B, C, F, H, W]."""
        raise NotImplementedError

    # -- RoPE ---------------------------------------------------------------------------------------------
    def temporal_rope(self, transformer) -> TemporalRope:
        """The temporal part of the model's RoPE (channels, theta), checked against its own tables."""
        raise NotImplementedError

    def rope_module(self, transformer) -> torch.nn.Module:
        """The module whose forward returns the (cos, sin) of its input's grid: the engine hooks it to hand
        each rank its own rows of the whole video's table."""
        raise NotImplementedError

    def global_rope(self, transformer, num_frames: int, height: int, width: int):
        """(cos, sin) of a whole video of `num_frames` latent frames, as the rope module would return them for
        an input of that size (latent height and width, before patching); tables grow to any length."""
        raise NotImplementedError

    def grow_rope(self, transformer, num_frames: int) -> bool:
        """Extend the model's RoPE tables to `num_frames` latent frames in place (bitwise the stock rows)."""
        raise NotImplementedError

    def set_temporal_frequency(self, transformer, index: int, omega: float):
        """Give temporal frequency `index` of the RoPE tables the angular frequency `omega` (radians per latent
        frame), in place (RIFLEx); returns the undo."""
        raise NotImplementedError
