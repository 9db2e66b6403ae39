"""RoPE tables for any number of latent frames.

diffusers' WanRotaryPosEmbed precomputes `rope_max_seq_len` (1024) rows per axis, so a video of more than
1024 latent frames (4097+ video frames) fails inside its forward. Under FreeLOC every temporal offset a layer
scores stays within the trained range R; only the natural positions that the stock path and the engine's
per-rank slicing read grow with F. `grow_rope_tables` extends the module's tables to F rows in place: the
existing rows are kept as they are (bitwise diffusers' values), the new ones are computed by the same
formula (angle = position x theta^(-2m/dim), float64, cos/sin repeated per channel pair, then float32).
The buffers are non-persistent, so the saved model is unchanged.
"""

from __future__ import annotations

import torch


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
