"""3-D RoPE in the interleaved-pair layout (Wan's and HunyuanVideo's), split so the temporal part can carry any
(re-encoded) offset. A family's own tables (which channels, theta) are read by its adapter (freeloc_dist.families).

The model rotates interleaved channel pairs of each head; the first `t_dim` channels carry the temporal
position, the rest the spatial (h, w) positions. FreeLOC only ever changes the temporal part, so we
keep diffusers' spatial rotation and apply the temporal one ourselves, at integer positions that may
be negative (a re-encoded offset o is scored as query at temporal position o, key at 0).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class TemporalRope:
    """Temporal rotation of the first t_dim channels: angle(pos, m) = pos * theta^(-2m / t_dim)."""

    t_dim: int
    theta: float = 10000.0

    def inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.t_dim, 2, dtype=torch.float64) / self.t_dim))

    def cos_sin(self, positions: torch.Tensor, device, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [*positions.shape, t_dim // 2] for integer positions (computed in float64)."""
        angles = positions.to(torch.float64)[..., None] * self.inv_freq().to(positions.device)
        return angles.cos().to(device, dtype), angles.sin().to(device, dtype)

    def rotate(self, x: torch.Tensor, positions) -> torch.Tensor:
        """Rotate x[..., :t_dim] to temporal `positions` (an int, or integers broadcastable to x.shape[:-1])."""
        pos = torch.as_tensor(positions)
        work = torch.promote_types(x.dtype, torch.float32)  # never rotate in half precision
        cos, sin = self.cos_sin(pos, x.device, work)  # [*pos.shape, t_dim/2]
        x1, x2 = x[..., : self.t_dim].to(work).unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
        return torch.cat((rotated.to(x.dtype), x[..., self.t_dim :]), dim=-1)


def rotate_temporal_(x: torch.Tensor, t_rope: TemporalRope, positions: torch.Tensor) -> torch.Tensor:
    """TemporalRope.rotate(x, positions) in place: x[..., :t_dim] times the phase of `positions`
    (integers broadcastable to x.shape[:-1]), one complex multiply over the temporal channels only.
    Half-precision x is rotated in float32 and written back."""
    half_t = t_rope.t_dim // 2
    work = torch.promote_types(x.dtype, torch.float32)
    cos, sin = t_rope.cos_sin(torch.as_tensor(positions), x.device, work)  # [*positions.shape, t_dim/2]
    phase = torch.complex(cos, sin)
    temporal = x[..., : t_rope.t_dim]
    if x.dtype == work and x.stride(-1) == 1:
        torch.view_as_complex(temporal.unflatten(-1, (half_t, 2))).mul_(phase)
    else:
        rotated = torch.view_as_complex(temporal.to(work).unflatten(-1, (half_t, 2)).contiguous()) * phase
        temporal.copy_(torch.view_as_real(rotated).flatten(-2))
    return x


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation as Wan applies it: x [B, L, h, d], cos/sin [1, L, 1, d] (repeated pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out


def split_rotations(q, k, rotary_emb, t_rope: TemporalRope, frames: torch.Tensor | None = None):
    """From un-rotated q, k [B, L, h, d] and Wan's (cos, sin): (q_nat, k_nat, q0, k0).

    q0, k0 carry the spatial rotation only (temporal position 0), ready to be given any temporal
    offset by TemporalRope.rotate. If `frames` (Long[L], each token's frame) is given, q_nat, k_nat
    carry the spatial rotation and temporal position `frames` (stock RoPE when frames are the natural
    ones); else they are None. Tables are cast to float32 once: the stock path multiplies in float64,
    which at small head counts costs more than the attention itself.
    """
    cos, sin = rotary_emb
    work = torch.promote_types(q.dtype, torch.float32)
    if q.dtype == work and k.dtype == work:
        return _split_rotations_complex(q, k, cos, sin, t_rope, frames)
    return _split_rotations_elementwise(q, k, cos, sin, t_rope, frames)


def _split_rotations_elementwise(q, k, cos, sin, t_rope: TemporalRope, frames):
    """split_rotations for any dtype (half-precision inputs are rotated in float32)."""
    work = torch.promote_types(q.dtype, torch.float32)
    cos0, sin0 = cos.to(work, copy=True), sin.to(work, copy=True)  # never edit the shared table
    cos0[..., : t_rope.t_dim] = 1.0
    sin0[..., : t_rope.t_dim] = 0.0
    q0, k0 = apply_rotary(q, cos0, sin0), apply_rotary(k, cos0, sin0)
    if frames is None:
        return None, None, q0, k0
    pos = frames.to(q.device)[:, None]  # [L, 1]: broadcast over heads of x [B, L, h, d]
    return t_rope.rotate(q0, pos), t_rope.rotate(k0, pos), q0, k0


def _split_rotations_complex(q, k, cos, sin, t_rope: TemporalRope, frames):
    """split_rotations for float32/64 q, k: each output is one complex multiply of the input's channel
    pairs by a per-token phase table [1, L, 1, d/2] (the generic path's elementwise chains and
    rotate-after-rotate cost several passes over q and k, ~0.02x a dense attention layer)."""
    half_t = t_rope.t_dim // 2
    phase0 = torch.complex(cos[..., 0::2].to(q.dtype), sin[..., 1::2].to(q.dtype))  # new [1, L, 1, d/2]
    phase0[..., :half_t] = 1.0  # temporal position 0

    def rotated(x, table):
        if x.stride(-1) != 1 or x.storage_offset() % 2:  # view_as_complex needs whole, aligned pairs
            x = x.contiguous()
        return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * table).flatten(-2)

    q0, k0 = rotated(q, phase0), rotated(k, phase0)
    if frames is None:
        return None, None, q0, k0
    cos_t, sin_t = t_rope.cos_sin(frames.to(q.device), q.device, q.dtype)  # [L, t_dim/2]
    phase_nat = phase0.clone()
    phase_nat[0, :, 0, :half_t] = torch.complex(cos_t, sin_t)
    return rotated(q, phase_nat), rotated(k, phase_nat), q0, k0
