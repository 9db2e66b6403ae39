"""Sequence-parallel attention strategies, one function each; all share one signature.

(q, k, v [B, Ls, h, d] of this rank's frames, un-rotated; ctx) -> out [B, Ls, h, d], where ctx
carries the layer plan, the shards, Wan's rotary tables and the Comm. Exactness against a single
process is the contract: every strategy computes the same softmax over the same keys.
With `lse=True` (joint text-video attention merges more key groups afterwards, parallel/joint.py) a strategy
returns (out [B, Ls, h, d] float32, lse Float32[B, h, Ls]) instead; without it, its path is unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from ..attention import get_backend
from ..attention.flex import flex_freeloc_attention
from ..attention.lse import merge_into
from ..attention.sdpa import grouped_attention
from ..choices import STRATEGIES as STRATEGY_NAMES
from ..plan import LayerPlan
from ..rope import TemporalRope, split_rotations
from .comm import Comm
from .decisions import ulysses_degree
from .shards import FrameShards, exchange_plan


@dataclasses.dataclass
class SPContext:
    plan: LayerPlan
    shards: FrameShards
    sp_rank: int
    rotary_global: tuple[torch.Tensor, torch.Tensor]  # Wan (cos, sin) [1, L, 1, d] for the whole video
    t_rope: TemporalRope
    comm: Comm
    backend: str
    tag: str  # byte-counter tag (the layer kind)

    @property
    def own(self) -> tuple[int, int]:
        return self.shards.ranges[self.sp_rank]

    def token_slice(self, start_frame, end_frame):
        n = self.plan.tokens_per_frame
        return slice(start_frame * n, end_frame * n)


def _local_rotations(q, k, ctx: SPContext, frames_range=None):
    s, e = ctx.own if frames_range is None else frames_range
    n = ctx.plan.tokens_per_frame
    cos, sin = ctx.rotary_global
    sl = ctx.token_slice(s, e)
    frames = torch.arange(s, e).repeat_interleave(n)
    return split_rotations(q, k, (cos[:, sl], sin[:, sl]), ctx.t_rope, frames)


def _heads_first(*xs):
    return [None if x is None else x.transpose(1, 2) for x in xs]


# ----------------------------------------------------------------------------------- Ulysses
def _heads_to_frames(q, k, v, ctx: SPContext, size: int):
    """All-to-all inside a group of `size` consecutive sp ranks: my frames x all heads ->
    the group's frames x heads / size. Returns (q, k, v [B, Lg, h/size, d], group frame range)."""
    bsz, _, heads, dim = q.shape
    hp, n = heads // size, ctx.plan.tokens_per_frame
    first = ctx.sp_rank - ctx.sp_rank % size
    members = range(first, first + size)
    qkv = torch.stack([q, k, v])  # [3, B, Ls, h, d]
    chunks = [qkv[:, :, :, j * hp : (j + 1) * hp] for j in range(size)]
    shapes = [(3, bsz, ctx.shards.sizes[m] * n, hp, dim) for m in members]
    parts = ctx.comm.all_to_all(chunks, shapes, ctx.tag, sub_group_size=size)
    q_g, k_g, v_g = torch.cat(parts, dim=2).unbind(0)
    return q_g, k_g, v_g, (ctx.shards.ranges[first][0], ctx.shards.ranges[first + size - 1][1])


def _frames_to_heads_with_lse(out_g, lse_g, ctx: SPContext, size: int):
    """_frames_to_heads of a float32 out [B, Lg, h/size, d] and its lse [B, h/size, Lg], sent as one more channel."""
    packed = _frames_to_heads(torch.cat([out_g.float(), lse_g.transpose(1, 2)[..., None]], dim=-1), ctx, size)
    return packed[..., :-1], packed[..., -1].transpose(1, 2)


def _frames_to_heads(out_g, ctx: SPContext, size: int):
    """Inverse of _heads_to_frames: the group's frames x heads / size -> my frames x all heads."""
    bsz, _, hp, dim = out_g.shape
    n = ctx.plan.tokens_per_frame
    first = ctx.sp_rank - ctx.sp_rank % size
    base = ctx.shards.ranges[first][0]
    back = [out_g[:, ctx.token_slice(s - base, e - base)] for s, e in ctx.shards.ranges[first : first + size]]
    own_tokens = ctx.shards.sizes[ctx.sp_rank] * n
    got = ctx.comm.all_to_all(back, [(bsz, own_tokens, hp, dim)] * size, ctx.tag, sub_group_size=size)
    return torch.cat(got, dim=2)  # heads back in rank order


def ulysses(q, k, v, ctx: SPContext, lse: bool = False):
    """All-to-all over heads: every rank attends the whole sequence for heads / P heads."""
    size = len(ctx.shards.ranges)
    q_all, k_all, v_all, frames = _heads_to_frames(q, k, v, ctx, size)
    if lse:
        q_nat, k_nat, q0, k0 = _heads_first(*_local_rotations(q_all, k_all, ctx, frames))
        out, out_lse = grouped_attention(q_nat, k_nat, q0, k0, v_all.transpose(1, 2), ctx.plan, ctx.t_rope)
        return _frames_to_heads_with_lse(out.transpose(1, 2), out_lse, ctx, size)
    out = get_backend(ctx.backend).run(q_all, k_all, v_all, ctx.rotary_global, ctx.plan, ctx.t_rope)
    return _frames_to_heads(out, ctx, size)


# -------------------------------------------------------------------------------------- ring
def _ring_core(q, k, v, ctx: SPContext, ranges, me: int, peer, return_lse: bool = False):
    """Ring over len(ranges) members; member i holds frames ranges[i]; peer(i) is its sp rank.

    K/V blocks rotate around the ring and partial results merge by log-sum-exp. Uses the grouped
    kernel (it returns lse); the flex backend cannot on CPU, so ring work is sdpa only.
    """
    num = len(ranges)
    n = ctx.plan.tokens_per_frame
    q_nat, k_nat, q0, k0 = _heads_first(*_local_rotations(q, k, ctx, ranges[me]))
    vt = v.transpose(1, 2)
    own = tuple(range(*ranges[me]))
    out = torch.zeros(q0.shape, dtype=torch.float32, device=q0.device)
    lse = torch.full(q0.shape[:-1], float("-inf"), device=q0.device)
    block_owner, block = me, (k0, vt)
    for step in range(num):
        wait = None
        if step < num - 1:  # post the next transfer, then compute on the block we hold
            src = (block_owner - 1) % num
            size = ranges[src][1] - ranges[src][0]
            _, wait = ctx.comm.exchange(
                [(peer((me + 1) % num), torch.stack(block))],
                [(peer((me - 1) % num), (2, *k0.shape[:2], size * n, k0.shape[-1]), k0.dtype)],
                ctx.tag,
            )
        s, e = ranges[block_owner]
        kb0, vb = block
        kb_nat = ctx.t_rope.rotate(kb0, torch.arange(s, e, device=q0.device).repeat_interleave(n))
        o, l = grouped_attention(
            q_nat, kb_nat, q0, kb0, vb, ctx.plan, ctx.t_rope, query_frames=own, key_frames=tuple(range(s, e))
        )
        merge_into(out, lse, o, l)
        if wait is not None:
            block = tuple(wait()[0].unbind(0))
            block_owner = src
    if return_lse:
        return out.transpose(1, 2), lse
    return out.to(q.dtype).transpose(1, 2)


def ring(q, k, v, ctx: SPContext, lse: bool = False):
    """K/V blocks of every sp rank rotate around the sp ring."""
    return _ring_core(q, k, v, ctx, ctx.shards.ranges, ctx.sp_rank, lambda i: i, return_lse=lse)


def hybrid(q, k, v, ctx: SPContext, lse: bool = False):
    """Ulysses inside groups of U consecutive ranks, ring across the P/U groups (U = ulysses_degree).

    For heads not divisible by P (Wan2.1-1.3B's 12 heads on 8 GPUs: U=4, 2 ring steps) this moves
    about a third of plain ring's bytes.
    """
    num_ranks = len(ctx.shards.ranges)
    size = ulysses_degree(q.shape[2], num_ranks)
    q_g, k_g, v_g, _ = _heads_to_frames(q, k, v, ctx, size)
    groups = [(ctx.shards.ranges[g * size][0], ctx.shards.ranges[g * size + size - 1][1])
              for g in range(num_ranks // size)]
    member = ctx.sp_rank % size
    out_g = _ring_core(q_g, k_g, v_g, ctx, groups, ctx.sp_rank // size, lambda g: g * size + member, return_lse=lse)
    if lse:
        return _frames_to_heads_with_lse(*out_g, ctx, size)
    return _frames_to_heads(out_g, ctx, size)


# ------------------------------------------------------------------------------- neighbour
def neighbour(q, k, v, ctx: SPContext, lse: bool = False):
    """Sparse layers (TSA, long-range dense layers): receive exactly the key frames this rank's queries attend
    (exchange_plan reads them from the plan's tiers), from the ranks that own them."""
    me = ctx.sp_rank
    n = ctx.plan.tokens_per_frame
    ex = exchange_plan(ctx.plan, ctx.shards)
    s, e = ctx.own
    q_nat, k_nat, q0, k0 = _heads_first(*_local_rotations(q, k, ctx))
    vt = v.transpose(1, 2)
    kv_frames = torch.stack([k0, vt]).unflatten(3, (e - s, n))  # [2, B, h, Fs, n, d]
    sends = [(dst, kv_frames[:, :, :, [f - s for f in frames]].flatten(3, 4)) for dst, frames in ex.sends[me]]
    recvs = [(src, (2, *k0.shape[:2], len(frames) * n, k0.shape[-1]), k0.dtype) for src, frames in ex.recvs[me]]
    _, wait = ctx.comm.exchange(sends, recvs, ctx.tag)
    own = tuple(range(s, e))
    remote_frames = tuple(f for _, frames in ex.recvs[me] for f in frames)
    if ctx.backend == "flex" and not lse:
        received = wait()
        key_frames = own + remote_frames
        k_buf = torch.cat([k0] + [b[0] for b in received], dim=2)
        v_buf = torch.cat([vt] + [b[1] for b in received], dim=2)
        out = flex_freeloc_attention(q0, k_buf, v_buf, ctx.plan, ctx.t_rope, query_frames=own, key_frames=key_frames)
        return out.transpose(1, 2)
    # Local keys first, while the neighbours' frames are in flight.
    out, out_lse = grouped_attention(q_nat, k_nat, q0, k0, vt, ctx.plan, ctx.t_rope, query_frames=own,
                                     key_frames=own)
    out = out.float()
    received = wait()
    if received:
        k_rem = torch.cat([b[0] for b in received], dim=2)
        v_rem = torch.cat([b[1] for b in received], dim=2)
        frames = torch.tensor(remote_frames, device=q0.device).repeat_interleave(n)
        o, l = grouped_attention(
            q_nat, ctx.t_rope.rotate(k_rem, frames), q0, k_rem, v_rem, ctx.plan, ctx.t_rope,
            query_frames=own, key_frames=remote_frames,
        )
        merge_into(out, out_lse, o, l)
    if lse:
        return out.transpose(1, 2), out_lse
    return out.to(q.dtype).transpose(1, 2)


STRATEGIES = {"ulysses": ulysses, "ring": ring, "hybrid": hybrid, "neighbour": neighbour}
assert tuple(STRATEGIES) == STRATEGY_NAMES, "freeloc_dist.choices.STRATEGIES must name exactly these"
