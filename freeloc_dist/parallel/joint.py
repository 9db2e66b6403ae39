"""Joint text-video attention under sequence parallelism (DESIGN 11): the text stream is replicated on every sp
rank, the video is split by frames.

Video queries (this rank's frames): the layer's strategy gives (out, lse) over every video key the plan attends
(the same strategies as Wan's self-attention, parallel/strategies.py, with lse), then the local text keys are one
more key group, merged by log-sum-exp. Text queries: each rank attends its own frames' video keys (at the text
phase of each frame) and returns a partial (out, lse); the partials are all-gathered (counted as `text`) and every
rank merges them in rank order after the text -> text part, so each replica of the text stream is computed by the
same operations on the same numbers and stays bitwise identical across ranks.

Shapes: B batch, Ls this rank's video tokens, Lt text tokens, h heads, d head channels.
"""

from __future__ import annotations

import torch

from ..attention.joint import text_phases
from ..attention.lse import attend, merge_into
from ..rope import rotate_temporal_
from .strategies import STRATEGIES, SPContext, _local_rotations


def joint_attention_sp(qv, kv, vv, qt, kt, vt, ctx: SPContext, strategy: str, *, text_phase: str,
                       text_valid: torch.Tensor | None):
    """(out_video [B, Ls, h, d], out_text [B, Lt, h, d]) of one joint layer on this rank."""
    plan, t_rope = ctx.plan, ctx.t_rope
    out, lse = STRATEGIES[strategy](qv, kv, vv, ctx, lse=True)  # [B, Ls, h, d] float32, [B, h, Ls]
    out = out.transpose(1, 2).contiguous()  # [B, h, Ls, d]
    s, e = ctx.own
    frames = torch.arange(s, e).repeat_interleave(plan.tokens_per_frame)
    q_nat, k_nat, q0, k0 = _local_rotations(qv, kv, ctx)  # [B, Ls, h, d], natural positions = global frames
    phase = text_phases(plan, text_phase)
    if torch.equal(phase, torch.arange(plan.num_frames)):
        q_text, k_text = q_nat, k_nat
    else:
        q_text, k_text = (rotate_temporal_(x.clone(), t_rope, phase[frames][:, None]) for x in (q0, k0))
    heads_first = lambda x: x.transpose(1, 2)  # noqa: E731
    num_ranks, d = len(ctx.shards.ranges), qt.shape[-1]
    out_t = torch.empty(qt.shape[0], qt.shape[2], qt.shape[1], d, dtype=torch.float32, device=qt.device)
    for b in range(qv.shape[0]):
        rows = (torch.arange(kt.shape[1]) if text_valid is None else text_valid[b].nonzero().flatten()).to(kt.device)
        kt_b, vt_b, qt_b = heads_first(kt[b:b + 1, rows]), heads_first(vt[b:b + 1, rows]), heads_first(qt[b:b + 1])
        if len(rows):  # video queries: the text keys are one more group
            o2, l2 = attend(heads_first(q_text[b:b + 1]), kt_b, vt_b)
            merge_into(out[b:b + 1], lse[b:b + 1], o2, l2)
        o_p, l_p = attend(qt_b, heads_first(k_text[b:b + 1]), heads_first(vv[b:b + 1]))  # this rank's frames
        partial = torch.cat([o_p.float(), l_p[..., None]], dim=-1)[None]  # [1, 1, h, Lt, d + 1]
        parts = ctx.comm.gather_frames(partial.contiguous(), [1] * num_ranks, dim=0, tag="text")
        if len(rows):
            o_t, l_t = attend(qt_b, kt_b, vt_b)
            o_t = o_t.float()
        else:
            o_t = torch.zeros(qt_b.shape, dtype=torch.float32, device=qt.device)
            l_t = torch.full(qt_b.shape[:-1], float("-inf"), device=qt.device)
        for r in range(num_ranks):  # rank order: the same merges on every rank
            merge_into(o_t, l_t, parts[r][..., :d], parts[r][..., d])
        out_t[b:b + 1] = o_t
    return out.transpose(1, 2).to(qv.dtype), out_t.transpose(1, 2).to(qt.dtype)
