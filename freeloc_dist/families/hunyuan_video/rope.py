"""HunyuanVideo's RoPE (diffusers' HunyuanVideoRotaryPosEmbed): computed per forward from the input's grid, each
head's channels [t | h | w] = rope_axes_dim (16 / 56 / 56) in interleaved pairs (Wan's layout) at one theta (256).
Its tables have no length limit, so nothing grows; the temporal part is checked against the module's own output.
Only video tokens carry RoPE; text tokens carry none (the joint attention's concern, freeloc_dist.attention.joint).
"""

from __future__ import annotations

import torch

from ...rope import TemporalRope


class _Shape:
    """Stand-in for the rope module's input: it reads `.shape` and `.device` only."""

    def __init__(self, shape, device="cpu"):
        self.shape = torch.Size(shape)
        self.device = torch.device(device)


def global_rope(transformer, num_frames: int, height: int, width: int, device="cpu"):
    """(cos, sin) [1, L, 1, d] of a whole video (latent height and width, before patching), as the processor
    reads them (the module returns [L, d])."""
    cos, sin = transformer.rope.forward(_Shape((1, 1, num_frames, height, width), device))
    return cos[None, :, None, :], sin[None, :, None, :]


def temporal_rope_of(transformer) -> TemporalRope:
    rope = transformer.rope
    t = TemporalRope(t_dim=int(rope.rope_dim[0]), theta=float(rope.theta))
    p, frames = rope.patch_size, 6
    cos, _ = rope.forward(_Shape((1, 1, frames * rope.patch_size_t, p, p)))  # one token per frame: [frames, d]
    ours, _ = t.cos_sin(torch.arange(frames), "cpu", torch.float64)
    if not torch.allclose(ours, cos[:, : t.t_dim : 2].double().cpu(), atol=1e-6):
        raise ValueError("transformer.rope: its temporal channels do not follow theta^(-2m/t_dim); not supported")
    return t
