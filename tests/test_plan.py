"""Plan math (no tensors of activations, no processes): phi, TSA tiers, token plans, overrides."""

import pytest
import torch

from freeloc_dist.plan import (
    DENSE,
    PlanError,
    default_stripe_width,
    derive_vrpr,
    layer_plan,
    phi_table,
    relative_positions,
    token_plan,
)

pytestmark = pytest.mark.unit


def _check_phi_properties(num_frames, trained_frames):
    r = trained_frames - 1
    params = derive_vrpr(num_frames, trained_frames)
    phi = phi_table(num_frames, trained_frames).tolist()
    assert phi[0] == 0
    steps = [b - a for a, b in zip(phi, phi[1:])]
    assert set(steps) <= {0, 1}, (num_frames, steps)
    assert max(phi) <= r
    w1 = params.windows[0]
    assert phi[: w1 + 1] == list(range(w1 + 1))
    assert w1 >= min(8, r // 2)
    rel = relative_positions(num_frames, trained_frames)
    assert torch.equal(rel, -rel.T)  # antisymmetric in fq - fk
    assert int(rel.abs().max()) <= r


@pytest.mark.parametrize("trained_frames", [21, 5, 3])
def test_phi_properties_for_every_length(trained_frames):
    for num_frames in range(trained_frames + 1, 20 * trained_frames + 1):
        _check_phi_properties(num_frames, trained_frames)


def test_phi_long_wan_renders_keep_wide_exact_window():
    # One and two minutes of Wan2.1 video: W1 stays >= 8, more tiers as F grows.
    for num_frames in (241, 481):
        _check_phi_properties(num_frames, 21)
        assert derive_vrpr(num_frames, 21).windows[0] >= 8
    assert len(derive_vrpr(481, 21).groups) >= len(derive_vrpr(241, 21).groups)


def _paper_phi(d, w1, w2, g1, g2, r=20):
    # DESIGN 4 written out independently of the planner.
    medium = lambda x: x // g1 + (w1 - w1 // g1)
    if d <= w1:
        v = d
    elif d <= w2:
        v = medium(d)
    else:
        v = d // g2 + (medium(w2) - w2 // g2)
    return min(v, r)


@pytest.mark.parametrize("num_frames, params", [(41, (12, 20, 2, 8)), (81, (10, 14, 2, 8))])
def test_paper_maps(num_frames, params):
    expected = [_paper_phi(d, *params) for d in range(num_frames)]
    assert phi_table(num_frames, 21).tolist() == expected
    assert derive_vrpr(num_frames, 21).windows == params[:2]
    # Spot values worked by hand: F=41: phi(20)=16, phi(40)=19; F=81: phi(14)=12, phi(80)=min(21,20).
    table = phi_table(num_frames, 21)
    if num_frames == 41:
        assert (int(table[20]), int(table[40])) == (16, 19)
    else:
        assert (int(table[14]), int(table[80])) == (12, 20)


def test_short_videos_are_untouched():
    for num_frames in (1, 5, 21):
        f = torch.arange(num_frames)
        assert torch.equal(relative_positions(num_frames, 21), f[:, None] - f[None, :])
        mask, offset = token_plan("tsa", (num_frames, 2, 3), 21)
        assert bool(mask.all())
        assert layer_plan("tsa", (num_frames, 2, 3), 21).is_stock


@pytest.mark.parametrize(
    "override, message",
    [
        ({"windows": [25], "groups": [2]}, "W1 must be <= clip"),
        ({"windows": [10], "groups": [2], "clip": 30}, "exceeds the trained range"),
        ({"windows": [10, 14], "groups": [2]}, "one group per window"),
        ({"windows": [14, 10], "groups": [2, 8]}, "strictly increasing"),
        ({"windows": [12], "groups": [2], "clip": 11}, "W1 must be <= clip"),
        ({"windows": [10], "groups": [0]}, "must be >= 1"),
        ({"windows": [10], "groups": [2], "width": 3}, "unknown key"),
        ({"windows": "10", "groups": [2]}, "list of integers"),
    ],
)
def test_bad_vrpr_override_is_a_clear_error(override, message):
    with pytest.raises(PlanError, match=message):
        relative_positions(81, 21, override)


def test_valid_override_is_used():
    rel = relative_positions(81, 21, {"windows": [12, 20], "groups": [2, 8]})
    assert int(rel[40, 0]) == _paper_phi(40, 12, 20, 2, 8)


def test_default_stripe_width():
    assert default_stripe_width(1560, 8, 24) == 195
    assert layer_plan("tsa", (30, 30, 52), 21).stripe_width == 195


def _naive_tsa_mask(grid, d1, d2, ds, sinks):
    num_frames, h, w = grid
    n = h * w
    size = num_frames * n
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        for j in range(size):
            fi, fj, si, sj = i // n, j // n, i % n, j % n
            d = abs(fi - fj)
            mask[i, j] = d <= d1 or (d1 < d <= d2 and abs(si - sj) < ds) or fj in sinks
    return mask


@pytest.mark.parametrize("num_frames", [6, 10, 19])
def test_tsa_token_plan_matches_definition(num_frames):
    tsa = {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 2, "sink_frames": [0, 4]}
    grid = (num_frames, 2, 3)
    mask, offset = token_plan("tsa", grid, 4, tsa=tsa)
    assert torch.equal(mask, _naive_tsa_mask(grid, 1, 3, 2, {0, 4}))
    rel = relative_positions(num_frames, 4)
    f = torch.arange(num_frames).repeat_interleave(6)
    assert torch.equal(offset, rel[f[:, None], f[None, :]])  # phi on every attended pair
    assert int(offset[mask].abs().max()) <= 3


def test_vrpr_and_full_token_plans():
    mask, offset = token_plan("vrpr", (9, 2, 2), 4)
    assert bool(mask.all()) and int(offset.abs().max()) <= 3
    mask, offset = token_plan("full", (9, 2, 2), 4)
    f = torch.arange(9).repeat_interleave(4)
    assert bool(mask.all()) and torch.equal(offset, f[:, None] - f[None, :])


def test_groups_partition_the_attended_frames():
    plan = layer_plan("tsa", (40, 4, 4), 5, tsa={"dense_frames": 2, "stripe_frames": 6})
    for a, groups in enumerate(plan.groups):
        covered = [b for g in groups for b in range(g.frame_start, g.frame_end)]
        assert covered == sorted(set(covered))
        assert covered == [b for b in range(40) if int(plan.tiers[a, b]) != 0]
        for g in groups:
            for b in range(g.frame_start, g.frame_end):
                expected = None if int(plan.offsets[a, b]) == a - b else int(plan.offsets[a, b])
                assert g.offset == expected


def test_plans_are_cached():
    assert layer_plan("tsa", (30, 4, 4), 21) is layer_plan("tsa", [30, 4, 4], 21)
    assert layer_plan("vrpr", (30, 4, 4), 21, {"windows": [10], "groups": [2]}) is layer_plan(
        "vrpr", (30, 4, 4), 21, {"groups": [2], "windows": [10]}
    )


def test_density_counts_attended_pairs():
    tsa = {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 2, "sink_frames": [0]}
    plan = layer_plan("tsa", (12, 2, 3), 4, tsa=tsa)
    mask, _ = token_plan("tsa", (12, 2, 3), 4, tsa=tsa)
    assert plan.density() == pytest.approx(float(mask.float().mean()))
    assert int((plan.tiers == DENSE).sum()) > 0
