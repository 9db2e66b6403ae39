"""Gradients of a FreeLOC layer: the backward of the `freeloc::attention` op, by recompute.

Every backend computes the same function of (q, k, v) (DESIGN 6; the reference is its definition), so one
backward serves them all. It recomputes the forward one query frame at a time (each query frame is one
softmax over the keys its plan row attends, the query rotated to each pair's offset, stripe pairs masked
to their band) and applies the softmax-attention backward to it at once, so what is held at any moment
is one query frame's scores [B, h, n, keys], never L x L. The spatial rotation (q -> q0) is undone by its
transpose. Plain tensor math, no autograd inside (the op runs below the autograd dispatch key).
Cost: about one extra forward (in float32, or float64 for float64 inputs) per backward, no saved scores.
Gradients w.r.t. the rotary tables (cos, sin) are not computed (diffusers' tables never require grad).
"""

from __future__ import annotations

import torch

from ..plan import NONE, STRIPE, LayerPlan
from ..rope import TemporalRope, apply_rotary, split_rotations


def _frame_vjp(q_a, keys, values, g_out, plan: LayerPlan, a: int, key_frames, t_rope: TemporalRope):
    """Query frame a's softmax over its attended keys and its backward. q_a [B, h, n, d] (temporal position 0),
    keys / values [B, h, K, n, d] of the frames `key_frames` (Long[K], the frames row a attends, in order),
    g_out [B, h, n, d]. Returns (dq_a [B, h, n, d], dkeys, dvalues [B, h, K, n, d])."""
    n, width = plan.tokens_per_frame, plan.stripe_width
    scale = q_a.shape[-1] ** -0.5
    offsets = plan.offsets[a, key_frames]
    striped = (plan.tiers[a, key_frames] == STRIPE) & (width < n)
    s = torch.arange(n)
    band = torch.zeros(n, n, dtype=q_a.dtype).masked_fill((s[:, None] - s[None, :]).abs() >= width, float("-inf"))
    groups, scores = [], []
    for o in offsets.unique().tolist():  # keys grouped by offset: one rotation of the query per distinct offset
        idx = (offsets == o).nonzero().flatten()
        q_o = t_rope.rotate(q_a, o)
        s_o = torch.matmul(q_o, keys[:, :, idx].flatten(2, 3).transpose(-1, -2)) * scale  # [B, h, n, |idx| n]
        if bool(striped[idx].any()):
            bias = torch.cat([band if bool(striped[i]) else torch.zeros_like(band) for i in idx.tolist()], 1)
            s_o = s_o + bias.to(q_a.device)
        groups.append((o, idx, q_o))
        scores.append(s_o)
    p = torch.softmax(torch.cat(scores, -1), dim=-1)  # one softmax over every attended key of frame a
    v_cat = torch.cat([values[:, :, idx].flatten(2, 3) for _, idx, _ in groups], 2)
    out = torch.matmul(p, v_cat)
    # softmax backward: dS = P * (dO V^T - rowsum(dO * O))
    d_s = p * (torch.matmul(g_out, v_cat.transpose(-1, -2)) - (g_out * out).sum(-1, keepdim=True))
    d_v_cat = torch.matmul(p.transpose(-1, -2), g_out)
    dq_a, dkeys, dvalues = torch.zeros_like(q_a), torch.zeros_like(keys), torch.zeros_like(values)
    col = 0
    for o, idx, q_o in groups:
        cols = slice(col, col + len(idx) * n)
        col = cols.stop
        d_s_o = d_s[..., cols]
        k_o = keys[:, :, idx].flatten(2, 3)
        dq_a += t_rope.rotate(torch.matmul(d_s_o, k_o) * scale, -o)  # the rotation's transpose is its inverse
        dkeys[:, :, idx] = (torch.matmul(d_s_o.transpose(-1, -2), q_o) * scale).unflatten(2, (len(idx), n))
        dvalues[:, :, idx] = d_v_cat[:, :, cols].unflatten(2, (len(idx), n))
    return dq_a, dkeys, dvalues


def _spatial_tables(rotary_emb, t_rope: TemporalRope, dtype):
    """Wan's (cos, sin) [1, L, 1, d] with the temporal channels at position 0: the rotation q -> q0."""
    cos, sin = rotary_emb
    cos0, sin0 = cos.to(dtype, copy=True), sin.to(dtype, copy=True)
    cos0[..., : t_rope.t_dim] = 1.0
    sin0[..., : t_rope.t_dim] = 0.0
    return cos0, sin0


def attention_vjp(grad_out, q, k, v, rotary_emb, plan: LayerPlan, t_rope: TemporalRope):
    """(dq, dk, dv) [B, L, h, d] of FreeLOC attention at un-rotated q, k, v [B, L, h, d] for grad_out [B, L, h, d].

    Plain tensor math (no autograd inside: the op runs below the autograd dispatch key)."""
    work = torch.promote_types(q.dtype, torch.float32)
    num_frames, n = plan.num_frames, plan.tokens_per_frame
    q0, k0 = split_rotations(q.to(work), k.to(work), rotary_emb, t_rope)[2:]  # [B, L, h, d]
    # frame-major views [B, h, F, n, d]
    frame_major = lambda x: x.transpose(1, 2).unflatten(2, (num_frames, n))  # noqa: E731
    q0f, k0f, vf, g_out = (frame_major(x.to(work)) for x in (q0, k0, v, grad_out))
    g_q0, g_k0, g_v = (torch.zeros_like(x) for x in (q0f, k0f, vf))
    for a in range(num_frames):
        key_frames = (plan.tiers[a] != NONE).nonzero().flatten()
        at = key_frames.to(k0f.device)
        dq_a, dk, dv = _frame_vjp(q0f[:, :, a], k0f.index_select(2, at), vf.index_select(2, at), g_out[:, :, a],
                                  plan, a, key_frames, t_rope)
        g_q0[:, :, a] = dq_a
        g_k0.index_add_(2, at, dk)
        g_v.index_add_(2, at, dv)
    to_tokens = lambda g: g.flatten(2, 3).transpose(1, 2)  # noqa: E731  [B, h, F, n, d] -> [B, L, h, d]
    cos0, sin0 = _spatial_tables(rotary_emb, t_rope, work)
    dq, dk = (apply_rotary(to_tokens(g), cos0, -sin0) for g in (g_q0, g_k0))  # q0 = R q, so dq = R^T dq0
    return dq.to(q.dtype), dk.to(k.dtype), to_tokens(g_v).to(v.dtype)
