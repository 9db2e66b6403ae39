"""Wan's RoPE tables (diffusers' WanRotaryPosEmbed): their temporal part, tables for any number of latent
frames, the whole video's table for the engine, and in-place edits of one temporal frequency (RIFLEx).

WanRotaryPosEmbed precomputes `rope_max_seq_len` (1024) rows per axis, so a video of more than 1024 latent
frames (4097+ video frames) fails inside its forward. Under FreeLOC every temporal offset a layer scores stays
within the trained range R; only the natural positions that the stock path and the engine's per-rank slicing
read grow with F. `grow_rope_tables` extends the module's tables to F rows in place: the existing rows are kept
as they are (bitwise diffusers' values), the new ones are computed by the same formula (angle = position x
theta^(-2m/dim), float64, cos/sin repeated per channel pair, then float32). The buffers are non-persistent, so
the saved model is unchanged.
"""

from __future__ import annotations

import torch

from ...rope import TemporalRope


def axis_table(dim: int, positions: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [positions, dim] of one RoPE axis in Wan's layout (each angle repeated for its pair)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = torch.outer(torch.arange(positions, dtype=torch.float64), inv_freq)  # [positions, dim/2]
    return (angles.cos().repeat_interleave(2, dim=1).float(), angles.sin().repeat_interleave(2, dim=1).float())


def rope_table(rope, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [rows, head_dim] with the t, h, w axes side by side, as WanRotaryPosEmbed lays them out."""
    parts = [axis_table(dim, rows) for dim in (rope.t_dim, rope.h_dim, rope.w_dim)]
    return torch.cat([c for c, _ in parts], dim=1), torch.cat([s for _, s in parts], dim=1)


def grow_rope_tables(rope, num_frames: int) -> bool:
    """Give `rope` (a WanRotaryPosEmbed) at least `num_frames` rows; True if it grew. Rows already there
    are not touched."""
    rows = rope.freqs_cos.shape[0]
    if num_frames <= rows:
        return False
    cos, sin = rope_table(rope, num_frames)
    device, dtype = rope.freqs_cos.device, rope.freqs_cos.dtype
    rope.freqs_cos = torch.cat([rope.freqs_cos, cos[rows:].to(device, dtype)])  # a buffer: stays one
    rope.freqs_sin = torch.cat([rope.freqs_sin, sin[rows:].to(device, dtype)])
    return True


def temporal_rope_of(transformer) -> TemporalRope:
    """TemporalRope matching a diffusers WanTransformer3DModel's rope, checked against its tables."""
    rope = transformer.rope
    t = TemporalRope(t_dim=rope.t_dim)
    positions = torch.arange(min(8, rope.max_seq_len))
    cos, _ = t.cos_sin(positions, "cpu")
    table = rope.freqs_cos
    theirs = table[: len(positions), : rope.t_dim : 2].double().cpu()
    # The table follows the model's casts (pipe.to(torch.bfloat16) rounds it): compare at the
    # precision it is stored in, never at float64's (which misread a cast table as another base).
    atol = max(1e-6, 2 * torch.finfo(table.dtype).eps) if table.is_floating_point() else 1e-6
    if not torch.allclose(cos.double(), theirs, atol=atol):
        raise ValueError("transformer.rope uses a temporal frequency base other than 10000; not supported")
    return t


class _Shape:
    """Stand-in for a tensor of which only `.shape` is read (WanRotaryPosEmbed.forward)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def global_rope(transformer, num_frames: int, height: int, width: int):
    """The rope module's (cos, sin) for a whole video of `num_frames` latent frames: past diffusers' 1024 rows
    the tables grow first; the module reads only its input's shape; forward() directly skips its hooks."""
    grow_rope_tables(transformer.rope, num_frames)
    return transformer.rope.forward(_Shape((1, 1, num_frames, height, width)))


def set_temporal_frequency(transformer, index: int, omega: float):
    """Give temporal frequency `index` of the rope tables (diffusers' WanRotaryPosEmbed buffers) the angular
    frequency `omega` (radians per latent frame); returns the undo."""
    rope = transformer.rope
    old_cos, old_sin = rope.freqs_cos.clone(), rope.freqs_sin.clone()
    pos = torch.arange(rope.freqs_cos.shape[0], dtype=torch.float64)
    cos, sin = torch.cos(pos * omega), torch.sin(pos * omega)
    for col in (2 * index, 2 * index + 1):  # interleaved pairs: columns 2k, 2k+1 hold frequency k
        rope.freqs_cos[:, col] = cos.to(rope.freqs_cos.dtype)
        rope.freqs_sin[:, col] = sin.to(rope.freqs_sin.dtype)

    def undo():
        rope.freqs_cos.copy_(old_cos)
        rope.freqs_sin.copy_(old_sin)

    return undo
