"""flex_attention backend: one softmax per query frame over keys re-rotated to carry their offsets.

Inductor's CPU flex kernel cannot return log-sum-exp, so this backend does not merge groups. It
folds each pair's offset into the key instead: query frame a sits at temporal position 0 and key
frame b is rotated to -offset(a, b), so <q, k> carries exactly offset(a, b) and all attended keys
of a query frame share one softmax. Keys are laid out in fixed "slots" (one key frame each, padded
to a multiple of the block size); which slots a query frame uses, and the stripe bands inside them,
are a BlockMask built once per plan. The same compiled kernel runs on CPU (the test suite) and CUDA.

Shapes: F frames, n tokens per frame, S slots, n_pad = n rounded up to the block size.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..plan import NONE, SINK, STRIPE, LayerPlan
from ..rope import TemporalRope, rotate_temporal_


@functools.cache
def _compiled_flex():
    return torch.compile(flex_attention, dynamic=False)


# Every (chunk, slot count, heads) shape compiles once (dynamic=False). Past dynamo's default recompile
# limit (8 per function: a queue of lengths, several strategies, a test suite) torch silently runs flex
# eagerly instead, with a dense L x L score matrix; so the calls below allow this many shapes.
FLEX_SHAPES = 256


@dataclasses.dataclass(frozen=True)
class SlotPlan:
    """Per-plan slot layout. slot_frames [F, S] key frame per slot (-1 unused), banded [S]."""

    slot_frames: torch.Tensor
    banded: torch.Tensor
    block: int
    n_pad: int


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def block_size(tokens_per_frame: int) -> int:
    """BlockMask block (both sides): 128, or the next power of two >= n for frames smaller than that."""
    return min(128, max(16, _next_pow2(tokens_per_frame)))


@functools.lru_cache(maxsize=64)
def slot_plan(plan: LayerPlan) -> SlotPlan:
    num_frames, n = plan.num_frames, plan.tokens_per_frame
    block = block_size(n)
    n_pad = -(-n // block) * block
    tiers = plan.tiers
    a = torch.arange(num_frames)[:, None]
    if plan.long_range is not None:  # key frames first (absolute slots), then the band (relative slots)
        slot_frames, banded = _long_range_slots(plan)
    elif plan.tsa is None:  # every key frame, in order; no bands
        slot_frames = torch.arange(num_frames).expand(num_frames, num_frames).clone()
        slot_frames[tiers[a, slot_frames] == NONE] = -1
        banded = torch.zeros(num_frames, dtype=torch.bool)
    else:
        d1 = plan.tsa.dense_frames
        reach = min(plan.tsa.stripe_frames, num_frames - 1)
        rel = torch.arange(-reach, reach + 1)[None, :]  # relative slots
        rel_banded = rel[0].abs() > d1
        b = a + rel
        inside = (b >= 0) & (b < num_frames)
        tier = torch.where(inside, tiers[a, b.clamp(0, num_frames - 1)], NONE)
        # Sinks beyond the dense band are served by their own unbanded slot, not by a banded one.
        ok = inside & (tier != NONE) & ~((tier == SINK) & rel_banded[None, :])
        rel_frames = torch.where(ok, b, -1)
        sinks = sorted(set(s for s in plan.tsa.sink_frames if s < num_frames))
        sink_cols = []
        for s in sinks:
            served = (a[:, 0] - s).abs() <= d1  # already in a dense relative slot
            sink_cols.append(torch.where(served, -1, s))
        slot_frames = torch.cat([torch.stack(sink_cols, 1) if sinks else rel_frames[:, :0], rel_frames], 1)
        banded = torch.cat([torch.zeros(len(sinks), dtype=torch.bool), rel_banded])
        # A "banded" slot whose band spans the whole frame (stripe_width >= n) is a full slot.
        banded = banded & (plan.stripe_width < n)
    _check_cover(plan, slot_frames, banded)
    return SlotPlan(slot_frames=slot_frames, banded=banded, block=block, n_pad=n_pad)


def _long_range_slots(plan: LayerPlan):
    """Slots of a long-range layer: one absolute slot per key frame (strided frames and sinks; unused where
    the key frame is inside the query's band), then 2B + 1 relative slots for the band. No bands inside
    slots: every attended pair is a whole frame. S = |key frames| + 2B + 1 slots instead of F."""
    num_frames = plan.num_frames
    a = torch.arange(num_frames)[:, None]
    reach = min(plan.long_range.band_frames, num_frames - 1)
    rel = torch.arange(-reach, reach + 1)[None, :]
    b = a + rel
    rel_frames = torch.where((b >= 0) & (b < num_frames), b, -1)
    keys = torch.tensor(plan.long_range.key_frames(num_frames), dtype=torch.long)[None, :]
    abs_frames = torch.where((a - keys).abs() <= reach, -1, keys.expand(num_frames, -1))
    slot_frames = torch.cat([abs_frames, rel_frames], 1)
    return slot_frames, torch.zeros(slot_frames.shape[1], dtype=torch.bool)


def _check_cover(plan: LayerPlan, slot_frames, banded) -> None:
    """Invariant: each attended frame pair is served exactly once, banded exactly when STRIPE. A real check
    (not an assert, which `python -O` removes): a wrong layout would silently drop or double keys."""
    num_frames = plan.num_frames
    count = torch.zeros(num_frames, num_frames, dtype=torch.long)
    for a in range(num_frames):
        for j, b in enumerate(slot_frames[a].tolist()):
            if b >= 0:
                count[a, b] += 1
                striped = int(plan.tiers[a, b]) == STRIPE and plan.stripe_width < plan.tokens_per_frame
                if bool(banded[j]) != striped:
                    raise RuntimeError(f"flex slot layout: pair ({a}, {b}) banded={bool(banded[j])}, "
                                       f"its tier says {striped}")
    if not torch.equal(count, (plan.tiers != NONE).long()):
        raise RuntimeError("flex slot layout does not cover the plan exactly once")


@functools.lru_cache(maxsize=64)
def block_masks(plan: LayerPlan, query_frames: tuple[int, ...], frames_per_call: int, device: str):
    """One BlockMask per chunk of `frames_per_call` query frames (the last chunk padded)."""
    sp = slot_plan(plan)
    n, blk, n_pad, width = plan.tokens_per_frame, sp.block, sp.n_pad, plan.stripe_width
    num_slots = sp.slot_frames.shape[1]
    blocks_per_slot = n_pad // blk
    nqb = -(-n // blk)
    q0 = torch.arange(nqb) * blk  # first spatial index of each q block
    q1 = torch.clamp(q0 + blk, max=n)  # one past the last
    kb = torch.arange(num_slots * blocks_per_slot)
    slot_of = kb // blocks_per_slot
    k0 = (kb % blocks_per_slot) * blk
    k1 = torch.clamp(k0 + blk, max=n)
    real = k0 < n  # block holds at least one real (unpadded) key
    unpadded = (k0 + blk) <= n
    band = sp.banded[slot_of]
    # [nqb, nkb]: reachable by the band at all, and entirely inside it
    near = (k0[None] - (q1[:, None] - 1) < width) & (q0[:, None] - (k1[None] - 1) < width)
    inside = torch.maximum(q1[:, None] - 1 - k0[None], k1[None] - 1 - q0[:, None]) < width
    any_ = real[None] & (~band[None] | near)
    full = unpadded[None] & (~band[None] | inside)
    valid = sp.slot_frames[:, slot_of] >= 0  # [F, nkb]
    any_f = valid[:, None, :] & any_[None]  # [F, nqb, nkb]
    full_f = valid[:, None, :] & full[None]
    partial_f = any_f & ~full_f

    banded_slots = sp.banded.to(device)

    def mask_mod_of(slot_used):
        """The whole mask, not only the partial blocks': eager flex (what torch runs when it does not
        compile, e.g. past dynamo's recompile limit) ignores the block lists, so a slot a query frame
        does not use (slot_used[b, slot] False) must be masked here too."""

        def mask_mod(b, h, q_idx, kv_idx):
            slot, s_k = kv_idx // n_pad, kv_idx % n_pad
            return slot_used[b, slot] & (s_k < n) & (~banded_slots[slot] | ((q_idx - s_k).abs() < width))

        return mask_mod

    masks = []
    for rows in _chunks(query_frames, frames_per_call):
        masks.append(
            BlockMask.from_kv_blocks(
                *_to_indices(partial_f[rows], device),
                *_to_indices(full_f[rows], device),
                BLOCK_SIZE=(blk, blk),
                mask_mod=mask_mod_of((sp.slot_frames[rows] >= 0).to(device)),
                seq_lengths=(n, num_slots * n_pad),
            )
        )
    return tuple(masks)


def _chunks(query_frames, size):
    """Query frames in chunks of `size`; the last one padded by repeating its last frame."""
    for c0 in range(0, len(query_frames), size):
        rows = list(query_frames[c0 : c0 + size])
        yield rows + [rows[-1]] * (size - len(rows))


def _to_indices(sel: torch.Tensor, device):
    """Bool[B, nqb, nkb] -> (num_blocks Int32[B, 1, nqb], indices Int32[B, 1, nqb, nkb]) as flex wants."""
    num = sel.sum(-1).to(torch.int32)
    order = torch.argsort((~sel).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num[:, None].to(device), order[:, None].contiguous().to(device)


@functools.lru_cache(maxsize=64)
def chunk_tables(plan: LayerPlan, query_frames: tuple[int, ...], key_frames: tuple[int, ...], frames_per_call: int,
                 device: str):
    """Per chunk of `frames_per_call` query frames (as block_masks cuts them): the chunk's slots as
    indices into the key buffer Long[C*S], their key temporal positions Long[C*S, 1] (key at -offset,
    query at 0), and the chunk's query rows Long[C]. Raises ValueError if the buffer lacks a frame."""
    sp = slot_plan(plan)
    buffer_of = torch.full((plan.num_frames,), -1, dtype=torch.long)
    buffer_of[list(key_frames)] = torch.arange(len(key_frames))
    needed = sp.slot_frames[list(query_frames)]
    if bool((buffer_of[needed.clamp(min=0)][needed >= 0] < 0).any()):
        raise ValueError("flex attention: the key buffer lacks frames these queries attend")
    row_of = {f: i for i, f in enumerate(query_frames)}
    tables = []
    for rows in _chunks(query_frames, frames_per_call):
        rows_t = torch.tensor(rows)
        frames = sp.slot_frames[rows_t].clamp(min=0)  # [C, S] global key frame per slot (unused: any)
        key_pos = -plan.offsets[rows_t[:, None], frames]
        tables.append((buffer_of[frames].clamp(min=0).flatten().to(device), key_pos.flatten()[:, None].to(device),
                       torch.tensor([row_of[f] for f in rows], device=device)))
    return tuple(tables)


def flex_freeloc_attention(
    q0, k0, v, plan: LayerPlan, t_rope: TemporalRope, *, query_frames=None, key_frames=None,
    kv_budget_bytes=256 << 20,
):
    """q0 [B, h, Lq, d] of `query_frames`; k0 (temporal position 0), v [B, h, Lk, d] holding the
    global frames `key_frames` (all by default; must include every frame those queries attend).
    Returns out [B, h, Lq, d]."""
    sp = slot_plan(plan)
    bsz, heads, _, dim = q0.shape
    num_frames, n, n_pad = plan.num_frames, plan.tokens_per_frame, sp.n_pad
    query_frames = tuple(range(num_frames)) if query_frames is None else tuple(query_frames)
    key_frames = tuple(range(num_frames)) if key_frames is None else tuple(key_frames)
    num_slots = sp.slot_frames.shape[1]
    per_frame = 2 * num_slots * n_pad * bsz * heads * dim * q0.element_size()
    frames_per_call = max(1, min(len(query_frames), kv_budget_bytes // per_frame))
    tables = chunk_tables(plan, query_frames, key_frames, frames_per_call, str(q0.device))
    masks = block_masks(plan, query_frames, frames_per_call, str(q0.device))

    pad = (0, 0, 0, n_pad - n)
    q_f = q0.unflatten(2, (len(query_frames), n))  # [B, h, Fq, n, d]
    # Keys and values frame-major per (batch, head) [B*h, Fk, n_pad, d]: a chunk's slots are then one
    # index_select into a new tensor, rotated in place, with no further copy (see below).
    k_f, v_f = (torch.nn.functional.pad(x.unflatten(2, (len(key_frames), n)), pad).flatten(0, 1) for x in (k0, v))
    out = torch.empty_like(q_f)
    flex = _compiled_flex()
    # Query frames go into the batch, which the BlockMask indexes; (B, h) are folded into heads.
    # [B*h, C*S, n_pad, d] -> [C, B*h, S*n_pad, d] is a view (flex reads strided inputs).
    to_batch = lambda x: x.unflatten(1, (-1, num_slots)).flatten(2, 3).transpose(0, 1)
    for (slots, key_pos, q_rows), mask in zip(tables, masks):
        k_c = rotate_temporal_(k_f.index_select(1, slots), t_rope, key_pos)
        v_c = v_f.index_select(1, slots)  # [B*h, C*S, n_pad, d]
        q_c = q_f[:, :, q_rows].permute(2, 0, 1, 3, 4).flatten(1, 2).contiguous()  # [C, B*h, n, d]
        with torch._dynamo.config.patch(recompile_limit=FLEX_SHAPES, accumulated_recompile_limit=4 * FLEX_SHAPES):
            o = flex(q_c, to_batch(k_c), to_batch(v_c), block_mask=mask)  # [C, B*h, n, d]
        o = o.unflatten(1, (bsz, heads)).permute(1, 2, 0, 3, 4)  # [B, h, C, n, d]
        out[:, :, q_rows] = o  # padded rows repeat the last frame: same values, harmless
    return out.flatten(2, 3)
