"""Grouped-softmax backend (DESIGN 6): per query frame, each run of keys sharing one temporal offset
is an ordinary attention returning (out, lse); runs merge exactly by log-sum-exp.

Memory stays O(n x keys of one group): the L x L score matrix is never formed. Banded (stripe) runs
are further split into spatial query chunks, each against only the key columns its band can reach,
so work tracks the attended pairs rather than whole frames.
"""

from __future__ import annotations

import functools

import torch

from ..plan import LayerPlan
from ..rope import TemporalRope
from .lse import attend, merge_all


@functools.lru_cache(maxsize=64)
def _band_chunks(n: int, width: int, chunk: int):
    """Spatial query chunks [r0, r1) and the key span [c0, c1) their band |s_q - s_k| < width reaches."""
    out = []
    for r0 in range(0, n, chunk):
        r1 = min(n, r0 + chunk)
        c0, c1 = max(0, r0 - width + 1), min(n, r1 + width - 1)
        s_q = torch.arange(r0, r1)[:, None]
        s_k = torch.arange(c0, c1)[None, :]
        bias = torch.zeros(r1 - r0, c1 - c0).masked_fill((s_q - s_k).abs() >= width, float("-inf"))
        out.append((r0, r1, c0, c1, bias))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def schedule(plan: LayerPlan, query_frames: tuple[int, ...], key_frames: tuple[int, ...]):
    """Per query frame: runs (offset, slot_start, slot_end, banded) over the key buffer.

    `key_frames` lists the global frame held at each frame slot of the key buffer; plan groups are
    cut where the buffer is not contiguous and dropped where a frame is absent (ring blocks,
    neighbour windows), so partial results over several buffers merge to the full attention.
    """
    where = {f: i for i, f in enumerate(key_frames)}
    out = []
    for a in query_frames:
        runs = []
        for g in plan.groups[a]:
            start = None
            for b in range(g.frame_start, g.frame_end + 1):
                slot = where.get(b) if b < g.frame_end else None
                if start is not None and (slot is None or slot != prev + 1):
                    runs.append((g.offset, start, prev + 1, g.banded))
                    start = None
                if slot is not None and start is None:
                    start = slot
                prev = slot
        out.append(tuple(runs))
    return tuple(out)


def grouped_attention(
    q_nat, k_nat, q0, k0, v, plan: LayerPlan, t_rope: TemporalRope, *, query_frames=None, key_frames=None,
    impl="auto", band_chunk=None,
):
    """FreeLOC attention of some query frames against the keys of some key frames.

    q_*: [B, h, Lq, d] for `query_frames` (global frame indices, default all); k_*, v: [B, h, Lk, d]
    holding the global frames `key_frames` (default all) in that order. q_nat/k_nat carry natural
    RoPE positions, q0/k0 temporal position 0. Returns (out [B, h, Lq, d], lse Float32[B, h, Lq]);
    rows with no key in this buffer get out 0 and lse -inf, so buffers can be merged afterwards.
    """
    n = plan.tokens_per_frame
    query_frames = tuple(range(plan.num_frames)) if query_frames is None else tuple(query_frames)
    key_frames = tuple(range(plan.num_frames)) if key_frames is None else tuple(key_frames)
    # One copy each into [B, h, L, d] row-major, so every slice below is a cheap contiguous view.
    q_nat, k_nat, q0, k0, v = (None if x is None else x.contiguous() for x in (q_nat, k_nat, q0, k0, v))
    out_all = torch.zeros(q0.shape, dtype=torch.float32, device=q0.device)
    lse_all = torch.full(q0.shape[:-1], float("-inf"), dtype=torch.float32, device=q0.device)
    width = plan.stripe_width
    chunks = _band_chunks(n, width, band_chunk or max(16, width))
    for qi, runs in enumerate(schedule(plan, query_frames, key_frames)):
        if not runs:
            continue
        rows = slice(qi * n, (qi + 1) * n)
        outs, lses = [], []
        for offset, fs, fe, banded in runs:
            if offset is None:
                q_g, k_g = q_nat[:, :, rows], k_nat[:, :, fs * n : fe * n]
            else:
                q_g, k_g = t_rope.rotate(q0[:, :, rows], offset), k0[:, :, fs * n : fe * n]
            v_g = v[:, :, fs * n : fe * n]
            if not banded:
                o, l = attend(q_g, k_g, v_g, impl=impl)
            else:
                o, l = _banded(q_g, k_g, v_g, fe - fs, n, chunks, impl)
            outs.append(o)
            lses.append(l)
        out_all[:, :, rows], lse_all[:, :, rows] = merge_all(outs, lses)
    return out_all.to(q0.dtype), lse_all


def _banded(q_g, k_g, v_g, frames, n, chunks, impl):
    """One striped run: spatial query chunks, each against the key columns its band reaches."""
    k_f = k_g.unflatten(2, (frames, n))
    v_f = v_g.unflatten(2, (frames, n))
    outs, lses = [], []
    for r0, r1, c0, c1, bias in chunks:
        k_c = k_f[:, :, :, c0:c1].flatten(2, 3)
        v_c = v_f[:, :, :, c0:c1].flatten(2, 3)
        bias_c = bias.to(q_g.device, q_g.dtype).repeat(1, frames)
        o, l = attend(q_g[:, :, r0:r1], k_c, v_c, bias_c, impl=impl)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)
