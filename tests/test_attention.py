"""Kernels against the oracle: a materialised score matrix with each pair's own temporal offset.

Tolerance: 1e-5 relative (Frobenius) in float32 against a float64 reference. The kernels' own
error is float32 rounding of dot products over <= a few hundred keys, measured ~2e-7; 1e-5 leaves
room for that and would still catch any wrong offset, mask or merge (those err by > 1e-2).
"""

import pytest
import torch
from _tiny import rel_err

from freeloc_dist.attention import sdpa
from freeloc_dist.attention.flex import flex_freeloc_attention, slot_plan
from freeloc_dist.attention.lse import attend, merge_into
from freeloc_dist.attention.reference import reference_attention
from freeloc_dist.attention.sdpa import grouped_attention
from freeloc_dist.plan import layer_plan, token_plan
from freeloc_dist.rope import TemporalRope

pytestmark = pytest.mark.unit

TOL = 1e-5
T = 4  # trained latent frames of these synthetic layers; R = 3
TSA = {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 3, "sink_frames": [0]}
GRID_HW = (3, 4)  # H != W, n = 12
T_ROPE = TemporalRope(t_dim=4)


def _inputs(num_frames, heads=3, dim=12, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = num_frames * GRID_HW[0] * GRID_HW[1]
    q0, k0, v = (torch.randn(batch, heads, size, dim, generator=g) for _ in range(3))
    frames = torch.arange(num_frames).repeat_interleave(GRID_HW[0] * GRID_HW[1])
    return q0, k0, v, T_ROPE.rotate(q0, frames), T_ROPE.rotate(k0, frames)


def _plan(kind, num_frames):
    return layer_plan(kind, (num_frames, *GRID_HW), T, tsa=TSA if kind == "tsa" else None)


CASES = [(kind, f) for kind in ("vrpr", "tsa") for f in (T + 1, 2 * T, 4 * T + 3)]


@pytest.mark.parametrize("impl", ["flash", "math"])
@pytest.mark.parametrize("band_chunk", [None, 5])
@pytest.mark.parametrize("kind, num_frames", CASES)
def test_grouped_sdpa_matches_reference(kind, num_frames, impl, band_chunk):
    q0, k0, v, q_nat, k_nat = _inputs(num_frames)
    plan = _plan(kind, num_frames)
    ref = reference_attention(q0, k0, v, plan, T_ROPE)
    out, lse = grouped_attention(q_nat, k_nat, q0, k0, v, plan, T_ROPE, impl=impl, band_chunk=band_chunk)
    assert rel_err(out, ref) < TOL
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("impl", ["flash", "math"])
@pytest.mark.parametrize("kind, num_frames", CASES)
def test_grouped_sdpa_tiled_query_frames(kind, num_frames, impl, monkeypatch):
    # At n = 12 no frame reaches the flash kernel's tall-query threshold; lower it so full-frame runs
    # are tiled over 3 query frames (shared keys, per-frame edge batches, shared sink keys).
    monkeypatch.setattr(sdpa, "FLASH_TALL_QUERY", 3 * GRID_HW[0] * GRID_HW[1])
    sdpa.batched_schedule.cache_clear()
    try:
        q0, k0, v, q_nat, k_nat = _inputs(num_frames)
        plan = _plan(kind, num_frames)
        frames = tuple(range(num_frames))
        if num_frames > 2 * T:
            # Tiles of 3 frames stepping by 3 (a staircase's blocks step by twice their size).
            assert any(b.q_frames == b.q_step == 3 for b in sdpa.batched_schedule(plan, frames, frames))
        out, _ = grouped_attention(q_nat, k_nat, q0, k0, v, plan, T_ROPE, impl=impl)
        assert rel_err(out, reference_attention(q0, k0, v, plan, T_ROPE)) < TOL
    finally:
        sdpa.batched_schedule.cache_clear()


@pytest.mark.parametrize("kind, num_frames", CASES)
def test_flex_matches_reference(kind, num_frames):
    q0, k0, v, _, _ = _inputs(num_frames)
    plan = _plan(kind, num_frames)
    ref = reference_attention(q0, k0, v, plan, T_ROPE)
    # A small budget forces several query-frame chunks (and a padded last chunk).
    out = flex_freeloc_attention(q0, k0, v, plan, T_ROPE, kv_budget_bytes=40_000)
    assert rel_err(out, ref) < TOL


def test_reference_sees_the_offsets():
    # Guard against a vacuous oracle: re-encoding must change the result versus natural offsets.
    q0, k0, v, _, _ = _inputs(2 * T)
    vrpr = reference_attention(q0, k0, v, _plan("vrpr", 2 * T), T_ROPE)
    stock = reference_attention(q0, k0, v, layer_plan("full", (2 * T, *GRID_HW), T), T_ROPE)
    assert rel_err(vrpr, stock) > 1e-3


def test_lse_merge_is_exact():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=g) for _ in range(3))
    out_all, lse_all = attend(q, k, v, impl="math")
    out = torch.zeros(1, 2, 9, 8)
    lse = torch.full((1, 2, 9), float("-inf"))
    for part in (slice(0, 4), slice(4, 9)):
        merge_into(out, lse, *attend(q, k[:, :, part], v[:, :, part]))
    assert rel_err(out, out_all) < TOL
    assert torch.allclose(lse, lse_all, atol=1e-6)


def _slot_mask(plan, sp) -> torch.Tensor:
    """The token pairs a slot layout serves, each counted: Long[L, L] (1 = served once), built from the slots
    alone, so the check does not rest on the library's own invariant check."""
    num_frames, n = plan.num_frames, plan.tokens_per_frame
    s = torch.arange(n)
    band = ((s[:, None] - s[None, :]).abs() < plan.stripe_width).long()
    count = torch.zeros(num_frames * n, num_frames * n, dtype=torch.long)
    for a in range(num_frames):
        for j, b in enumerate(sp.slot_frames[a].tolist()):
            if b >= 0:
                count[a * n : (a + 1) * n, b * n : (b + 1) * n] += band if bool(sp.banded[j]) else 1
    return count


def test_flex_slots_cover_each_pair_once_with_far_sinks():
    # Sinks inside the stripe zone and beyond it: every attended token pair is served by exactly one slot, and
    # no other pair, against the contract's token mask (freeloc_dist.plan.token_plan).
    tsa = {"dense_frames": 2, "stripe_frames": 6, "sink_frames": [0, 13]}
    grid = (30, 2, 3)
    plan = layer_plan("tsa", grid, 5, tsa=tsa)
    mask, _ = token_plan("tsa", grid, 5, tsa=tsa)
    assert torch.equal(_slot_mask(plan, slot_plan(plan)), mask.long())


def _frames_slice(x, frames, n):
    idx = torch.cat([torch.arange(f * n, (f + 1) * n) for f in frames])
    return x[:, :, idx]


@pytest.mark.parametrize("kind", ["vrpr", "tsa", "full"])
def test_partial_key_buffers_merge_to_the_whole(kind):
    # Ring attention's view: queries of frames 5..9 against three uneven blocks of key frames.
    num_frames, n = 4 * T + 3, GRID_HW[0] * GRID_HW[1]
    q0, k0, v, q_nat, k_nat = _inputs(num_frames)
    plan = _plan(kind, num_frames)
    ref = reference_attention(q0, k0, v, plan, T_ROPE)
    query_frames = tuple(range(5, 10))
    out = torch.zeros(_frames_slice(q0, query_frames, n).shape)
    lse = torch.full(out.shape[:-1], float("-inf"))
    for block in (range(0, 6), range(6, 8), range(8, num_frames)):
        o, l = grouped_attention(
            _frames_slice(q_nat, query_frames, n), _frames_slice(k_nat, block, n),
            _frames_slice(q0, query_frames, n), _frames_slice(k0, block, n), _frames_slice(v, block, n),
            plan, T_ROPE, query_frames=query_frames, key_frames=tuple(block),
        )
        merge_into(out, lse, o, l)
    assert rel_err(out, _frames_slice(ref, query_frames, n)) < TOL


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_window_plus_sink_buffer(backend):
    # Neighbour exchange's view: frames 12..14 need keys within D2=3 of them plus the sink frame 0.
    num_frames, n = 4 * T + 3, GRID_HW[0] * GRID_HW[1]
    q0, k0, v, q_nat, k_nat = _inputs(num_frames)
    plan = _plan("tsa", num_frames)
    ref = reference_attention(q0, k0, v, plan, T_ROPE)
    query_frames, key_frames = (12, 13, 14), (0, *range(9, 18))
    sub = lambda x, frames: _frames_slice(x, frames, n)
    if backend == "sdpa":
        out, _ = grouped_attention(
            sub(q_nat, query_frames), sub(k_nat, key_frames), sub(q0, query_frames), sub(k0, key_frames),
            sub(v, key_frames), plan, T_ROPE, query_frames=query_frames, key_frames=key_frames,
        )
    else:
        out = flex_freeloc_attention(
            sub(q0, query_frames), sub(k0, key_frames), sub(v, key_frames), plan, T_ROPE,
            query_frames=query_frames, key_frames=key_frames,
        )
        with pytest.raises(ValueError, match="lacks frames"):
            flex_freeloc_attention(
                sub(q0, query_frames), sub(k0, key_frames[1:]), sub(v, key_frames[1:]), plan, T_ROPE,
                query_frames=query_frames, key_frames=key_frames[1:],
            )
    assert rel_err(out, sub(ref, query_frames)) < TOL


@pytest.mark.parametrize("with_frames", [True, False])
def test_split_rotations_complex_and_elementwise_paths_agree(with_frames):
    """float32 inputs take the complex-multiply path, half precision the elementwise one: same rotations.
    With natural frames q_nat/k_nat are stock RoPE (Wan's table applied as is). Tolerance 1e-6: both are
    one or two float32 rotations of the same values (measured 0 to ~1e-7)."""
    from freeloc_dist.rope import _split_rotations_elementwise, apply_rotary, split_rotations

    num_frames, n, heads, dim = 5, GRID_HW[0] * GRID_HW[1], 3, 12
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, num_frames * n, heads, dim, generator=g) for _ in range(2))
    frames = torch.arange(num_frames).repeat_interleave(n)
    # A Wan-like table: temporal angles frame * inv_freq, then spatial angles; pairs repeated.
    angles = torch.cat([frames[:, None].double() * T_ROPE.inv_freq(),
                        torch.rand(len(frames), (dim - T_ROPE.t_dim) // 2, generator=g, dtype=torch.float64) * 6], 1)
    angles = angles.repeat_interleave(2, -1)[None, :, None]  # [1, L, 1, d]
    cos, sin = angles.cos().float(), angles.sin().float()
    fr = frames if with_frames else None
    fast = split_rotations(q, k, (cos, sin), T_ROPE, fr)
    slow = _split_rotations_elementwise(q, k, cos, sin, T_ROPE, fr)
    assert (fast[0] is None) == (not with_frames)
    for a, b in zip(fast, slow):
        if a is not None:
            assert a.dtype == torch.float32 and rel_err(a, b) < 1e-6
    if with_frames:
        assert rel_err(fast[0], apply_rotary(q, cos, sin)) < 1e-6 and rel_err(fast[1], apply_rotary(k, cos, sin)) < 1e-6
    half = split_rotations(q.bfloat16(), k.bfloat16(), (cos, sin), T_ROPE, fr)  # the elementwise path
    for a, b in zip(half, fast):
        if a is not None:
            assert rel_err(a.float(), b) < 1e-2  # bf16 inputs: 8 mantissa bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_temporal_in_place_matches_rotate(dtype):
    """rotate_temporal_ (the flex backend's key rotation) equals TemporalRope.rotate, per-slot positions
    included, and leaves the spatial channels alone. float32: 1e-6 (one complex multiply vs the
    elementwise chain, both float32); bf16: both rotate in float32 and round once, so they differ by at
    most one bf16 rounding (2^-8 relative) where the two float32 results straddle a rounding boundary."""
    from freeloc_dist.rope import rotate_temporal_

    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 7, 5, 12, generator=g).to(dtype)  # [BH, slots, tokens, d]
    positions = torch.randint(-9, 10, (7, 1), generator=g)  # one temporal position per slot
    expected = T_ROPE.rotate(x, positions)
    got = rotate_temporal_(x.clone(), T_ROPE, positions)
    assert torch.equal(got[..., T_ROPE.t_dim:], x[..., T_ROPE.t_dim:])
    if dtype == torch.float32:
        assert rel_err(got, expected) < 1e-6
    else:
        assert got.dtype == torch.bfloat16 and rel_err(got.float(), expected.float()) < 2 ** -8
    strided = torch.randn(7, 3, 5, 12, generator=g).transpose(0, 1)  # not contiguous: rotated in its own storage
    assert rel_err(rotate_temporal_(strided.clone(), T_ROPE, positions), T_ROPE.rotate(strided, positions)) < 1e-6


@pytest.mark.parametrize("kind, num_frames", CASES)
def test_flex_masks_are_complete_without_block_sparsity(kind, num_frames, monkeypatch):
    """Eager flex_attention (what torch runs uncompiled, e.g. past dynamo's recompile limit) applies only
    the BlockMask's mask_mod, ignoring its block lists: the mask_mod alone must give the plan's mask."""
    from torch.nn.attention.flex_attention import flex_attention

    from freeloc_dist.attention import flex

    monkeypatch.setattr(flex, "_compiled_flex", lambda: flex_attention)
    q0, k0, v, _, _ = _inputs(num_frames)
    plan = _plan(kind, num_frames)
    out = flex_freeloc_attention(q0, k0, v, plan, T_ROPE, kv_budget_bytes=40_000)
    assert rel_err(out, reference_attention(q0, k0, v, plan, T_ROPE)) < TOL


def test_flex_calls_run_under_the_raised_recompile_limit(monkeypatch):
    """Dynamo's default limit of 8 compiled shapes would make later flex calls run eagerly (dense L x L
    scores); each call runs with the limit raised to flex.FLEX_SHAPES."""
    from freeloc_dist.attention import flex

    seen = []

    def recording_flex(*args, **kwargs):
        seen.append(torch._dynamo.config.recompile_limit)
        return compiled(*args, **kwargs)

    compiled = flex._compiled_flex()
    monkeypatch.setattr(flex, "_compiled_flex", lambda: recording_flex)
    q0, k0, v, _, _ = _inputs(T + 1)
    before = torch._dynamo.config.recompile_limit
    flex_freeloc_attention(q0, k0, v, _plan("vrpr", T + 1), T_ROPE)
    assert seen and all(limit == flex.FLEX_SHAPES > 8 for limit in seen)
    assert torch._dynamo.config.recompile_limit == before  # scoped: the process-wide setting is untouched


@pytest.mark.parametrize("impl", ["flash", "math"])
@pytest.mark.parametrize("kind", ["vrpr", "tsa"])
def test_grouped_sdpa_in_bfloat16(kind, impl):
    """Real models render in bf16: its query rotations take the elementwise path (complex views need
    float32/64). Tolerance 1e-2: bf16 keeps 8 mantissa bits (2^-8 = 3.9e-3 per rounding; measured
    ~4.5e-3 with the inputs rounded too), while stock positions instead of FreeLOC's err by ~0.5 here."""
    num_frames = 4 * T + 3
    q0, k0, v, q_nat, k_nat = _inputs(num_frames)
    plan = _plan(kind, num_frames)
    out, lse = grouped_attention(*(x.bfloat16() for x in (q_nat, k_nat, q0, k0, v)), plan, T_ROPE, impl=impl)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert rel_err(out.float(), reference_attention(q0, k0, v, plan, T_ROPE)) < 1e-2


def test_flex_in_bfloat16():
    """The flex backend on bf16 inputs (its CUDA dtype): keys rotated in float32 and rounded once;
    tolerance as in test_grouped_sdpa_in_bfloat16."""
    num_frames = 4 * T + 3
    q0, k0, v, _, _ = _inputs(num_frames)
    plan = _plan("tsa", num_frames)
    out = flex_freeloc_attention(q0.bfloat16(), k0.bfloat16(), v.bfloat16(), plan, T_ROPE)
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), reference_attention(q0, k0, v, plan, T_ROPE)) < 1e-2


@pytest.mark.parametrize("kind", ["vrpr", "tsa"])
def test_sdpa_backend_one_token_per_frame(kind):
    """A 16x16 video has one token per frame: the size-1 token axis's stride must not be trusted (it
    failed an assert in every tiny long render). Through the backend entry, as the processor calls it."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from freeloc_dist.attention import get_backend

    num_frames, g = 4 * T + 3, torch.Generator().manual_seed(0)
    plan = layer_plan(kind, (num_frames, 1, 1), T, tsa=TSA if kind == "tsa" else None)
    q, k, v = (torch.randn(1, num_frames, 3, 12, generator=g) for _ in range(3))  # [B, L, h, d] as projected
    rotary = WanRotaryPosEmbed(12, (1, 2, 2), 64)(torch.empty(1, 4, num_frames, 2, 2))
    out = get_backend("sdpa").run(q, k, v, rotary, plan, T_ROPE)  # [B, L, h, d]
    _, _, q0, k0 = sdpa_split(q, k, rotary)
    ref = reference_attention(q0, k0, v.transpose(1, 2), plan, T_ROPE).transpose(1, 2)
    assert rel_err(out, ref) < TOL


def sdpa_split(q, k, rotary):
    from freeloc_dist.rope import split_rotations

    return [None if x is None else x.transpose(1, 2) for x in split_rotations(q, k, rotary, T_ROPE)]
