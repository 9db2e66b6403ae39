"""Grouped-softmax backend (DESIGN 6): each run of keys sharing one temporal offset is an ordinary
attention returning (out, lse); runs merge exactly by log-sum-exp.

Runs are batched across query frames: every query frame whose run has the same (offset, banded,
length) and whose key frames are a fixed stride further than its neighbour's goes into the batch
dimension of one kernel call, with the keys as an overlapping strided view of the key buffer (no
copy). Most frames of a long video share their relative run pattern, so a layer is a few hundred
large calls instead of one small call per (query frame, run).

A long range's key frames beyond the band are strided in the key buffer, so each would be a run of its
own; they are served from one contiguous copy of the buffer's key frames instead, where adjacent key frames
sharing an offset form one run; the query frames sharing a run's key window (stride_frames of them) are one
block, and blocks stepping evenly are one batch of strided views (no per-call copies of keys).

The saturated phi level's run grows by one key frame per query frame (its start is the video's first frame),
so no two query frames share its length: it is split into the keys every query frame of the shard shares
plus one batch per bit of the remainder (_staircases). With calls sized to a fraction of the layer's output
(call_budget), a run kind is a bounded number of calls, so a layer's calls follow its phi levels, not F.

Banded (stripe) runs are further split into spatial query chunks, each against only the key
columns its band can reach, so work tracks the attended pairs rather than whole frames. Memory
stays O(one call): the L x L score matrix is never formed.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..plan import LayerPlan
from ..rope import TemporalRope
from .lse import attend, uses_flash

# Elements of the largest tensor one call materialises: its [batch, B*h, rows, keys] scores on the
# matmul path, its output on the flash path (which only holds a block of scores). Batches are cut
# to stay near one unbatched full-frame group, so batching does not raise peak memory.
CALL_BUDGET = 1 << 24

# ... or, for a large shard, 1/CALLS_PER_KIND of the layer's output (the float32 accumulator the layer holds
# anyway): a run kind (one phi level, one side) is then about CALLS_PER_KIND calls whatever the shard, so a
# layer's calls are bounded by its levels, not by F, for at most 2/CALLS_PER_KIND of the accumulator more
# (a call's output and its rotated queries).
CALLS_PER_KIND = 8


def call_budget(layer_elements: int) -> int:
    """Elements of the largest tensor one call may materialise, for a layer whose output has layer_elements."""
    return max(CALL_BUDGET, layer_elements // CALLS_PER_KIND)


# torch's CPU flash kernel takes 256-row query blocks from 768 query rows on (at most 64 below),
# which is ~10% faster per pair; full-frame runs of small frames are tiled over query frames to
# reach it (see _tiled). At Wan's n = 1560 one frame already has enough rows.
FLASH_TALL_QUERY = 768


@dataclasses.dataclass(frozen=True)
class RunBatch:
    """Item i < count: query slots [q_start + i * q_step, ... + q_frames) against key slots
    [k_start + i * k_step, ... + frames), all at one offset rule."""

    offset: int | None
    banded: bool
    frames: int
    q_start: int
    count: int
    k_start: int
    k_step: int
    q_step: int = 1
    q_frames: int = 1


# Band key spans are widened (with masked columns) to a multiple of this many keys: the CPU flash
# kernel runs rows of scores in 16-float vectors, and a ragged span of ~100 keys costs ~15% more
# than the aligned one (94 -> 96 keys at Ds = 32); longer spans barely notice either way.
KEY_ALIGN = 16


@functools.lru_cache(maxsize=64)
def _band_chunks(n: int, width: int, chunk: int) -> tuple[tuple[int, int, int, int], ...]:
    """Spatial query chunks [r0, r1) and the key span [c0, c1) their band |s_q - s_k| < width
    reaches, widened within [0, n) to a multiple of KEY_ALIGN."""
    out = []
    for r0 in range(0, n, chunk):
        r1, c0, c1 = min(n, r0 + chunk), max(0, r0 - width + 1), min(n, r0 + chunk + width - 1)
        span = min(n, -(-(c1 - c0) // KEY_ALIGN) * KEY_ALIGN)
        c1 = min(n, c0 + span)
        out.append((r0, r1, c1 - span, c1))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _band_bias(n: int, width: int, chunk: int, index: int, frames: int, device, dtype) -> torch.Tensor:
    """Additive 0/-inf mask [rows, frames * cols] of one band chunk tiled over `frames` key frames."""
    r0, r1, c0, c1 = _band_chunks(n, width, chunk)[index]
    far = (torch.arange(r0, r1)[:, None] - torch.arange(c0, c1)[None, :]).abs() >= width
    bias = torch.zeros(r1 - r0, c1 - c0).masked_fill(far, float("-inf"))
    return bias.repeat(1, frames).to(device, dtype)


@functools.lru_cache(maxsize=256)
def schedule(plan: LayerPlan, query_frames: tuple[int, ...], key_frames: tuple[int, ...], far: bool | None = None):
    """Per query frame: runs (offset, slot_start, slot_end, banded) over the key buffer.

    `key_frames` lists the global frame held at each frame slot of the key buffer; a run is a span
    of consecutive slots sharing one rule (see _key_runs_of), so plan groups are cut where the
    buffer is not contiguous and dropped where a frame is absent (ring blocks, neighbour windows),
    and partial results over several buffers merge to the full attention.
    far (long-range plans): True keeps only the key frames beyond the band (tier SINK), False the others.
    Python steps per query frame: one per group and buffer piece, not one per key frame.
    """
    pieces = _buffer_pieces(plan.num_frames, key_frames)
    out = []
    for a in query_frames:
        runs = []
        for offset, start, end, banded in _key_runs_of(plan, a, far, pieces):
            if runs and runs[-1][0] == offset and runs[-1][3] == banded and runs[-1][2] == start:
                runs[-1] = (offset, runs[-1][1], end, banded)
            else:
                runs.append((offset, start, end, banded))
        out.append(tuple(runs))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _buffer_pieces(num_frames: int, key_frames: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """(slot, piece_end) per global frame: its slot in the buffer (-1 if absent), and the end of the
    maximal span of frames from it that sit in consecutive slots (absent: the next present frame)."""
    slot = [-1] * num_frames
    for i, f in enumerate(key_frames):
        slot[f] = i
    piece_end = [num_frames] * num_frames
    for f in range(num_frames - 2, -1, -1):
        nxt = slot[f + 1]
        same_piece = (slot[f] < 0) == (nxt < 0) and (slot[f] < 0 or nxt == slot[f] + 1)
        piece_end[f] = piece_end[f + 1] if same_piece else f + 1
    return slot, piece_end


def _key_runs_of(plan: LayerPlan, a: int, far: bool | None, pieces):
    """(offset rule, slot_start, slot_end, banded) of query frame a's groups cut into buffer pieces, in key
    order. Banded natural frames get their fixed offset a - b (the same rotation), one frame each: they join
    a neighbouring run of equal offset where there is one (d = 10 and 11 at W1 = 10), and no band chunk
    needs a copy of the natural key columns."""
    slot, piece_end = pieces
    for g in plan.groups[a]:
        if far is not None and g.sink != far:
            continue
        b = g.frame_start
        while b < g.frame_end:
            e = min(g.frame_end, piece_end[b])
            if slot[b] >= 0:
                if g.banded and g.offset is None:
                    yield from ((a - f, slot[f], slot[f] + 1, True) for f in range(b, e))
                else:
                    yield g.offset, slot[b], slot[b] + e - b, g.banded
            b = e


def far_key_frames(plan: LayerPlan, key_frames: tuple[int, ...]) -> tuple[int, ...]:
    """The long range's key frames held in the buffer `key_frames`, in buffer order (() without a long range).
    Attended beyond the band, they are strided in the buffer, so grouped_attention serves them from a
    contiguous copy: adjacent key frames sharing an offset then form one run (one kernel call), not one each."""
    if plan.long_range is None:
        return ()
    keys = set(plan.long_range.key_frames(plan.num_frames))
    return tuple(f for f in key_frames if f in keys)


@functools.lru_cache(maxsize=256)
def batched_schedule(plan: LayerPlan, query_frames: tuple[int, ...], key_frames: tuple[int, ...],
                     far: bool | None = None):
    """The runs of `schedule` as RunBatches: per run kind, blocks of query slots packed while their query and
    key starts step evenly. A run whose length grows (or shrinks) by one key frame per query slot, the
    saturated phi level, is a staircase: one batch for the keys all its slots share plus one per bit of the
    remainder (_staircases), not one call per query slot. With far True (the long range's key frames beyond
    the band, `key_frames` their contiguous copy) consecutive query slots sharing a key window are one block
    (q_frames), so a run kind is a few batches of strided views whatever the shard."""
    by_kind: dict[tuple, list[tuple[int, int]]] = {}
    for qi, runs in enumerate(schedule(plan, query_frames, key_frames, far)):
        for offset, fs, fe, banded in runs:
            # Keyed by side too: natural-offset runs before and after a query frame share
            # (offset, banded, frames), and interleaved in one list they would break every batch.
            side = key_frames[fs] > query_frames[qi]
            by_kind.setdefault((offset, banded, fe - fs, side), []).append((qi, fs))
    batches = []
    if not far:
        by_kind, batches = _staircases(by_kind)
    for (offset, banded, frames, _), items in by_kind.items():
        blocks = _blocks(items) if far else [(qi, 1, fs) for qi, fs in items]
        for q_start, q_frames, q_step, k_start, k_step, count in _packed(blocks, None if far else 1):
            batch = RunBatch(offset, banded, frames, q_start, count, k_start, k_step, q_step, q_frames)
            batches.extend(_tiled(batch, -(-FLASH_TALL_QUERY // plan.tokens_per_frame)))
    return tuple(batches)


def _blocks(items):
    """(q_start, q_frames, k_start) blocks of consecutive query slots with one key start, from (slot, k_start)."""
    out = []
    for qi, fs in items:
        if out and out[-1][2] == fs and out[-1][0] + out[-1][1] == qi:
            out[-1] = (out[-1][0], out[-1][1] + 1, fs)
        else:
            out.append((qi, 1, fs))
    return out


def _packed(blocks, q_step_only=None):
    """(q_start, q_frames, q_step, k_start, k_step, count): greedy runs of equal-size blocks whose query and
    key starts step evenly (the key step >= 0: strided views cannot step backwards); q_step_only: the only
    query step allowed (band chunks take consecutive query frames)."""
    i = 0
    while i < len(blocks):
        q_start, q_frames, k_start = blocks[i]
        count, q_step, k_step = 1, q_step_only, None
        while i + count < len(blocks):
            qi, qf, fs = blocks[i + count]
            overlaps = qi < blocks[i + count - 1][0] + q_frames  # a query slot twice in one call
            uneven = (q_step is not None and qi != q_start + count * q_step) or (
                k_step is not None and fs != k_start + count * k_step)
            if qf != q_frames or fs < k_start or overlaps or uneven:
                break
            if count == 1:
                q_step, k_step = qi - q_start, fs - k_start
            count += 1
        yield q_start, q_frames, q_step or 1, k_start, k_step or 0, count
        i += count


# A staircase of fewer query slots is left to per-kind batches (the split would not save calls).
MIN_STAIRCASE = 4


def _staircases(by_kind):
    """(the other runs by kind, RunBatches of the staircases): maximal spans of consecutive query slots whose
    run of one (offset, banded, side) keeps its start and grows by one key frame per slot, or keeps its end
    and shrinks by one (the saturated phi level before / after the query frame). Spans of fewer than
    MIN_STAIRCASE slots stay per kind, and so do banded runs."""
    families: dict[tuple, list[tuple[int, int, int]]] = {}
    rest: dict[tuple, list[tuple[int, int]]] = {}
    for (offset, banded, frames, side), items in by_kind.items():
        if banded:  # band chunks take one query frame per item (see run)
            rest[(offset, banded, frames, side)] = items
        else:
            families.setdefault((offset, banded, side), []).extend((qi, fs, fs + frames) for qi, fs in items)
    batches = []
    for (offset, banded, side), runs in families.items():
        runs.sort()
        i = 0
        while i < len(runs):
            m, grow = 1, None
            while i + m < len(runs):
                (q0, s0, e0), (q1, s1, e1) = runs[i + m - 1], runs[i + m]
                step = (q1 == q0 + 1 and s1 == s0 and e1 == e0 + 1, q1 == q0 + 1 and s1 == s0 + 1 and e1 == e0)
                if not any(step) or (grow is not None and not step[1 - grow]):
                    break
                grow = step[0] if grow is None else grow
                m += 1
            if m >= MIN_STAIRCASE:
                (q0, s0, e0), (_, s_last, e_last) = runs[i], runs[i + m - 1]
                shared = (s0, e0) if grow else (s_last, e_last)  # the keys of every slot of the span
                if shared[1] > shared[0]:
                    batches.append(RunBatch(offset, banded, shared[1] - shared[0], q0, m, shared[0], 0))
                batches.extend(RunBatch(offset, banded, *t) for t in _triangle(q0, m, shared[grow], grow))
            else:
                for qi, fs, fe in runs[i:i + m]:
                    rest.setdefault((offset, banded, fe - fs, side), []).append((qi, fs))
            i += m
    return rest, batches


def _triangle(q0: int, m: int, edge: int, grow: bool):
    """RunBatch fields (frames, q_start, count, k_start, k_step, q_step, q_frames) covering: query slot q0 + i
    (i < m) against keys [edge, edge + i) (grow) or [edge - (m - 1 - i), edge) (shrink). Slot i's keys are
    split by the bits of its length: bit j (h = 2^j) is h key frames, the same for h consecutive slots and
    stepping by 2h with them, so each bit is one evenly stepped batch (plus one for a partial last block)."""
    h = 1
    while h < m:
        period = 2 * h
        full, tail = divmod(m, period)
        tail = max(0, tail - h)  # slots of the partial last block that have bit j set
        if grow:  # i in [g * period + h, (g + 1) * period): keys [edge + g * period, + h)
            if full:
                yield h, q0 + h, full, edge, period, period, h
            if tail:
                yield h, q0 + full * period + h, 1, edge + full * period, 0, 1, tail
        else:  # mirrored: slot m - 1 - i' for i' as above, keys [edge - g * period - h, edge - g * period)
            if tail:
                yield h, q0, 1, edge - full * period - h, 0, 1, tail
            if full:
                yield h, q0 + m - full * period, full, edge - (full - 1) * period - h, period, period, h
        h = period


def call_items(b: RunBatch, budget: int, per_frame: int) -> tuple[int, int]:
    """(Query frames per sub-block, items per call) of full-frame batch b, for a call of at most `budget`
    elements when one query frame of an item costs per_frame (B*h * n * d on the flash path, B*h * n * keys on
    the matmul path)."""
    size = _block_split(b.q_frames, b.count, max(1, budget // per_frame))
    return size, max(1, budget // (size * per_frame))


@functools.lru_cache(maxsize=1024)
def _block_split(q_frames: int, count: int, cap: int) -> int:
    """Query frames per sub-block when a batch of `count` blocks of q_frames query frames is cut into
    sub-blocks of at most `cap` frames (a call's budget): the size that needs the fewest calls."""
    def calls(size):
        sizes = [size] * (q_frames // size) + [q_frames % size] * (q_frames % size > 0)
        return sum(-(-count // (cap // x)) for x in sizes)

    return min(range(min(q_frames, cap), 0, -1), key=calls)


def _tiled(b: RunBatch, p: int) -> list[RunBatch]:
    """Split a full-frame batch so p consecutive query frames share one call over their common keys.

    With k_step 0 the items already share all keys. With k_step 1, item i's keys [k, k + frames)
    shift by one frame per query frame, so frames u < p of a tile share [k0 + p - 1, k0 + frames);
    each frame's remaining p - 1 key frames (before and after that span) become small batches of
    their own. Exact: every (query, key) pair stays in exactly one call.
    """
    if p <= 1 or b.banded or b.k_step not in (0, 1) or (b.q_step, b.q_frames) != (1, 1) or b.count < p \
            or b.frames < 2 * p * b.k_step:
        return [b]
    tiles, rest = divmod(b.count, p)
    shared = b.frames - (p - 1) * b.k_step
    out = [dataclasses.replace(b, frames=shared, count=tiles, k_start=b.k_start + (p - 1) * b.k_step,
                               k_step=p * b.k_step, q_step=p, q_frames=p)]
    for u in range(p if b.k_step else 0):
        edge = dict(count=tiles, k_step=p, q_start=b.q_start + u, q_step=p)
        if p - 1 - u:
            out.append(dataclasses.replace(b, frames=p - 1 - u, k_start=b.k_start + u, **edge))
        if u:
            out.append(dataclasses.replace(b, frames=u, k_start=b.k_start + b.frames, **edge))
    if rest:
        out.append(dataclasses.replace(b, count=rest, q_start=b.q_start + tiles * p,
                                       k_start=b.k_start + tiles * p * b.k_step))
    return out


@functools.lru_cache(maxsize=256)
def _phase(t_rope: TemporalRope, offset: int, device, dtype) -> torch.Tensor:
    """e^(i * offset * inv_freq): the temporal rotation to `offset` as complex factors [t_dim / 2]."""
    cos, sin = t_rope.cos_sin(torch.tensor(offset), device, dtype)
    return torch.complex(cos, sin)


def _rotate(x: torch.Tensor, t_rope: TemporalRope, offset: int, into: torch.Tensor | None = None) -> torch.Tensor:
    """TemporalRope.rotate(x, offset) as one copy and one complex multiply of the temporal channels
    (rotate's elementwise chain costs several passes; queries are rotated once per run).

    `into`, if given, already holds x's other channels; only the temporal ones are written (a band
    chunk copies its query rows once and re-rotates them in place for each offset)."""
    if x.dtype not in (torch.float32, torch.float64):
        return t_rope.rotate(x, offset)
    pairs = lambda t: torch.view_as_complex(t[..., : t_rope.t_dim].unflatten(-1, (-1, 2)))
    phase = _phase(t_rope, offset, x.device, x.dtype)
    if into is not None:
        torch.mul(pairs(x), phase, out=pairs(into))
        return into
    out = _copy_in_place_order(x)
    pairs(out).mul_(phase)
    return out


def _copy_in_place_order(x: torch.Tensor) -> torch.Tensor:
    """A dense copy of x (always a new tensor) laid out in x's own stride order. From the usual
    token-major [B, L, h, d] inputs this copies whole tokens; a head-major copy (.contiguous())
    reads 256-byte pieces 3 KB apart, ~1.6x slower, and would leave the kernel's token-major
    outputs and the accumulators in different orders."""
    order = sorted(range(x.dim()), key=lambda i: -x.stride(i))
    dense = x.permute(order).clone(memory_format=torch.contiguous_format)
    return dense.permute([order.index(i) for i in range(x.dim())])


def _frame_windows(x: torch.Tensor, start: int, step: int, frames: int, count: int) -> torch.Tensor:
    """[count, BH, frames * m, d] strided view of x [BH, F, m, d] (tokens evenly strided across
    frames, channels contiguous): item i holds frames [start + i * step, ... + frames). Items may
    overlap in memory when only read (key windows)."""
    bh, _, m, d = x.shape
    # With one token per frame (m == 1) the token stride is meaningless (torch reports any value for
    # a size-1 dim); the merged frames x tokens dim then steps by whole frames.
    token_stride = x.stride(2) if m > 1 else x.stride(1)
    assert x.stride(1) == m * token_stride and (d == 1 or x.stride(3) == 1), "frames must be evenly strided"
    base = x.storage_offset() + start * x.stride(1)
    return x.as_strided((count, bh, frames * m, d), (step * x.stride(1), x.stride(0), token_stride, 1), base)


@functools.lru_cache(maxsize=1024)
def _slots_of(key_frames: tuple[int, ...], frames: tuple[int, ...], device) -> torch.Tensor:
    """Long[len(frames)]: the buffer slot of each of `frames` in the buffer holding `key_frames`."""
    where = {f: i for i, f in enumerate(key_frames)}
    return torch.tensor([where[f] for f in frames], device=device)


def _merge(out_acc, lse_acc, out, lse):
    """lse.merge_into for a fresh kernel result, whose lse is finite (every row attends a key): the
    new weight is then sigmoid(lse - lse_acc), 1 where the accumulator is still empty, and the
    update one lerp pass instead of lse.merge_into's guarded exp / mul / addcmul chain."""
    w_new = torch.sigmoid(lse - lse_acc)
    torch.logaddexp(lse_acc, lse, out=lse_acc)
    out_acc.lerp_(out.float(), w_new.unsqueeze(-1))


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
    batch, heads, _, d = q0.shape
    bh = batch * heads

    def frames_view(x, num):
        """[B, h, num * n, d] -> [B*h, num, n, d]: a view when B = 1, even of the usual transposed
        [B, L, h, d] (the kernels take strided tokens), so the inputs are not copied."""
        if x is None:
            return None
        return (x if x.stride(-1) == 1 else x.contiguous()).reshape(bh, num, n, d)

    q_nat, q0 = (frames_view(x, len(query_frames)) for x in (q_nat, q0))
    k_nat, k0, v = (frames_view(x, len(key_frames)) for x in (k_nat, k0, v))
    # Accumulators [BH, F, n, d] and [BH, F, n] in the inputs' token order: the flash kernel writes
    # (out, lse) token-major, so merges then stream matching layouts instead of 256-byte pieces.
    # Left unset: a query frame's first full-frame result is copied in, not merged (see `touched`).
    f32 = dict(dtype=torch.float32, device=q0.device)
    if q0.stride(0) < q0.stride(2):
        out_all = torch.empty((len(query_frames), n, bh, d), **f32).permute(2, 0, 1, 3)
        lse_all = torch.empty((len(query_frames), n, bh), **f32).permute(2, 0, 1)
    else:
        out_all = torch.empty((bh, len(query_frames), n, d), **f32)
        lse_all = torch.empty((bh, len(query_frames), n), **f32)
    touched = [False] * len(query_frames)
    budget = call_budget(bh * len(query_frames) * n * d)

    def clear(frames):
        """Set the accumulators of untouched query slots `frames` to 'no key yet' (out 0, lse -inf)."""
        for f in frames:
            if not touched[f]:
                out_all[:, f].zero_()
                lse_all[:, f].fill_(float("-inf"))
                touched[f] = True

    def run(b: RunBatch, rows: slice | None, keys, values, bias, q_rows_buf=None):
        """Attend the batch's query frames (only rows `rows` of each, if given) to their key windows;
        merge. q_rows_buf: a copy of q0's `rows` of every query frame, rotated in place per call."""
        q_src = q_nat if b.offset is None else q0
        per_row = d if uses_flash(impl, q0.device) else b.frames * keys.shape[2]
        if rows is None:  # blocks of query frames: at most a call's budget each
            size, per_call = call_items(b, budget, bh * n * per_row)
            if size < b.q_frames:
                for u in range(0, b.q_frames, size):
                    run(dataclasses.replace(b, q_start=b.q_start + u, q_frames=min(size, b.q_frames - u)),
                        rows, keys, values, bias)
                return
        else:
            per_call = max(1, budget // (bh * (rows.stop - rows.start) * per_row))
        for s in range(0, b.count, per_call):
            c = min(per_call, b.count - s)
            q_at = b.q_start + s * b.q_step
            into, fresh = None, False
            if rows is None:  # whole frames: q_frames consecutive frames per item
                q = _frame_windows(q_src, q_at, b.q_step, b.q_frames, c)
                acc = _frame_windows(out_all, q_at, b.q_step, b.q_frames, c)
                lse_acc = _frame_windows(lse_all.unsqueeze(-1), q_at, b.q_step, b.q_frames, c).squeeze(-1)
                slots = [q_at + i * b.q_step + u for i in range(c) for u in range(b.q_frames)]
                fresh = not any(touched[f] for f in slots)
                if fresh:  # the copy below sets these slots whole
                    for f in slots:
                        touched[f] = True
                else:
                    clear(slots)
            else:
                frames = slice(q_at, q_at + c)
                q = q_src[:, frames, rows].transpose(0, 1)  # [c, BH, rows, d] view
                acc, lse_acc = out_all[:, frames, rows].transpose(0, 1), lse_all[:, frames, rows].transpose(0, 1)
                into = None if q_rows_buf is None else q_rows_buf[:, frames].transpose(0, 1)
            k_at = b.k_start + s * b.k_step
            k_win = _frame_windows(keys, k_at, b.k_step, b.frames, c)
            if b.offset is not None and rows is None and b.k_step == 0 and b.frames < c * b.q_frames:
                # Every item reads the same few key frames (the sink): give those keys temporal
                # position -offset, the same relative offset, instead of copying every query frame.
                shared = _rotate(keys[:, k_at:k_at + b.frames], t_rope, -b.offset)
                k_win = _frame_windows(shared, 0, 0, b.frames, c)
            elif b.offset is not None:
                q = _rotate(q, t_rope, b.offset, into)
            v_win = _frame_windows(values, k_at, b.k_step, b.frames, c)
            out, lse = attend(q, k_win, v_win, bias, impl=impl)
            if fresh:
                acc.copy_(out)
                lse_acc.copy_(lse)
            else:
                _merge(acc, lse_acc, out, lse)

    far_frames = far_key_frames(plan, key_frames)
    batches = batched_schedule(plan, query_frames, key_frames, False if far_frames else None)
    for b in batches:
        if not b.banded:
            run(b, None, k_nat if b.offset is None else k0, v, None)
    clear(range(len(query_frames)))  # query frames no full-frame run reached
    if far_frames:  # the long range's key frames beyond the band, from one contiguous copy of them
        slots = _slots_of(key_frames, far_frames, q0.device)
        far = batched_schedule(plan, query_frames, far_frames, True)
        k0_far, v_far = (x.index_select(1, slots) for x in (k0, v))
        k_nat_far = k_nat.index_select(1, slots) if any(b.offset is None for b in far) else None
        for b in far:
            run(b, None, k_nat_far if b.offset is None else k0_far, v_far, None)
    banded = [b for b in batches if b.banded]  # all at fixed offsets (see _key_frames_of): q0, k0
    chunk = band_chunk or max(16, plan.stripe_width)
    for index, (r0, r1, c0, c1) in enumerate(_band_chunks(n, plan.stripe_width, chunk) if banded else ()):
        # Key columns this chunk's band reaches, of every key frame: one copy per chunk, then
        # every banded batch reads them through strided frame windows.
        k_cols = _copy_in_place_order(k0[:, :, c0:c1])
        v_cols = _copy_in_place_order(v[:, :, c0:c1])
        q_rows_buf = _copy_in_place_order(q0[:, :, r0:r1])
        for b in banded:
            bias = _band_bias(n, plan.stripe_width, chunk, index, b.frames, q0.device, q0.dtype)
            run(b, slice(r0, r1), k_cols, v_cols, bias, q_rows_buf)
    out = out_all.view(batch, heads, len(query_frames) * n, d).to(q0.dtype)
    return out, lse_all.view(batch, heads, len(query_frames) * n)
