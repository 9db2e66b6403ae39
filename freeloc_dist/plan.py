"""Planning: shapes and settings in, frozen tables out.

Everything FreeLOC decides before touching a tensor lives here: the VRPR relative-position map phi
(DESIGN 4), the TSA tiers (DESIGN 5), and per-layer frame tables that the attention kernels read.
Plans depend only on (kind, grid, trained_frames, settings) and are cached, so a render builds each
one once per shape, never per step.

Legend: F latent frames, n tokens per frame (H*W after patching), R = trained_frames - 1,
d = |f_query - f_key| a temporal distance, L = F*n tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import torch

from .errors import UserError

KINDS = ("full", "vrpr", "tsa")

# Published settings for Wan2.1 (T=21) from the FreeLOC paper, keyed by (T, F).
PAPER_VRPR = {
    (21, 41): ((12, 20), (2, 8)),
    (21, 81): ((10, 14), (2, 8)),
}

# Tier codes of a (query frame, key frame) pair. SINK: the whole key frame is attended at any distance
# (TSA's sink frames, and a long-range layer's key frames and sinks beyond its dense band).
NONE, DENSE, STRIPE, SINK = 0, 1, 2, 3


class PlanError(UserError, ValueError):
    """A FreeLOC setting that breaks a property of DESIGN 4/5."""


def balanced_ranges(total: int, parts: int) -> tuple[tuple[int, int], ...]:
    """[start, end) of `parts` contiguous ranges covering [0, total) whose sizes differ by at most one (the
    first total mod parts are one longer): how latent frames split over ranks, for sampling and decode."""
    assert 1 <= parts <= total, (total, parts)
    base, extra = divmod(total, parts)
    ranges, start = [], 0
    for r in range(parts):
        size = base + (1 if r < extra else 0)
        ranges.append((start, start + size))
        start += size
    return tuple(ranges)


# --------------------------------------------------------------------------------------------- VRPR
@dataclasses.dataclass(frozen=True, kw_only=True)
class VRPRParams:
    """windows[k] < d <= windows[k+1] uses groups[k]; the last tier is open-ended. clip None = R."""

    windows: tuple[int, ...]
    groups: tuple[int, ...]
    clip: int | None = None

    @classmethod
    def from_mapping(cls, m) -> "VRPRParams":
        if isinstance(m, VRPRParams):
            return m
        unknown = set(m) - {"windows", "groups", "clip"}
        if unknown:
            raise PlanError(f"vrpr: unknown key(s) {sorted(unknown)}; allowed: windows, groups, clip")
        for key in ("windows", "groups"):
            if key not in m:
                raise PlanError(f"vrpr.{key}: missing")
            vals = m[key]
            if not isinstance(vals, (list, tuple)) or not all(_is_int(v) for v in vals):
                raise PlanError(f"vrpr.{key}={vals!r}: must be a list of integers")
        clip = m.get("clip")
        if clip is not None and not _is_int(clip):
            raise PlanError(f"vrpr.clip={clip!r}: must be an integer")
        return cls(windows=tuple(m["windows"]), groups=tuple(m["groups"]), clip=clip)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def phi_unclipped(d: int, p: VRPRParams) -> int:
    """phi before the final min(., clip): identity up to W1, then floor(d/G_k) + c_k per tier."""
    w = p.windows
    if d <= w[0]:
        return d
    value_at_start = w[0]  # phi at the lower edge of the current tier
    for k, g in enumerate(p.groups):
        lo = w[k]
        hi = w[k + 1] if k + 1 < len(w) else None
        c = value_at_start - lo // g  # makes the tier continuous at its lower edge
        if hi is None or d <= hi:
            return d // g + c
        value_at_start = hi // g + c
    raise AssertionError("unreachable: last tier is open-ended")


def check_vrpr_params(p: VRPRParams, trained_frames: int) -> None:
    """The checks of VRPR params that hold for every video length (a profile is refused at load, not at the
    first long render). With integer groups >= 1 and continuous tiers, phi steps by 0 or 1 for any F."""
    r = trained_frames - 1
    w, g = p.windows, p.groups
    if not w:
        raise PlanError("vrpr.windows: needs at least W1")
    if len(g) != len(w):
        raise PlanError(f"vrpr.groups={list(g)}: needs one group per window (got {len(g)} for {len(w)} windows)")
    if any(x < 1 for x in w) or any(b <= a for a, b in zip(w, w[1:])):
        raise PlanError(f"vrpr.windows={list(w)}: must be positive and strictly increasing")
    if any(x < 1 for x in g):
        raise PlanError(f"vrpr.groups={list(g)}: must be >= 1")
    clip = r if p.clip is None else p.clip
    if clip > r:
        raise PlanError(f"vrpr.clip={clip}: exceeds the trained range R={r}")
    if w[0] > clip:
        raise PlanError(f"vrpr.windows[0]={w[0]}: W1 must be <= clip={clip} so that phi(d)=d for d<=W1")


def _check_vrpr(p: VRPRParams, num_frames: int, trained_frames: int) -> None:
    """Validate the shape of the params and the DESIGN 4 properties on every d in [0, F)."""
    check_vrpr_params(p, trained_frames)
    w, g, clip = p.windows, p.groups, trained_frames - 1 if p.clip is None else p.clip
    table = [min(phi_unclipped(d, p), clip) for d in range(num_frames)]
    for d in range(1, num_frames):
        step = table[d] - table[d - 1]
        if step not in (0, 1):
            raise PlanError(f"vrpr {list(w)}/{list(g)}: phi({d})-phi({d - 1})={step}, must be 0 or 1")


def derive_vrpr(num_frames: int, trained_frames: int) -> VRPRParams | None:
    """Tiers for F latent frames of a model trained on T; None when nothing is out of range.

    Rule (documented in README): tier groups double (..., G/2, G); every tier but the last spans m
    phi-levels. Search the coarsest group G = 2, 4, 8, ... in order, and for each G the most tiers
    first (groups starting at 2), then the largest W1 (exact local motion), then the largest m; take
    the first candidate whose unclipped phi(F-1) fits in R. W1 never drops below min(8, R//2), so
    local motion keeps exact positions.
    """
    r = trained_frames - 1
    d_max = num_frames - 1
    if d_max <= r:
        return None
    if (trained_frames, num_frames) in PAPER_VRPR:
        w, g = PAPER_VRPR[(trained_frames, num_frames)]
        return VRPRParams(windows=w, groups=g)
    w1_min = max(1, min(8, r // 2))
    for coarsest_exp in range(1, 64):
        for num_tiers in range(coarsest_exp, 0, -1):
            groups = tuple(2 ** (coarsest_exp - num_tiers + 1 + k) for k in range(num_tiers))
            for w1 in range(r, w1_min - 1, -1):
                for m in range(r, 0 if num_tiers > 1 else -1, -1):
                    windows = [w1]
                    for g in groups[:-1]:
                        windows.append(windows[-1] + g * m)
                    p = VRPRParams(windows=tuple(windows), groups=groups)
                    if phi_unclipped(d_max, p) <= r:
                        return p
    raise PlanError(f"cannot derive VRPR tiers for F={num_frames}, T={trained_frames}")


def resolve_vrpr(num_frames: int, trained_frames: int, vrpr=None) -> VRPRParams | None:
    """User override (validated) or derived params; None when F <= T."""
    if trained_frames < 2:
        raise PlanError(f"trained_frames={trained_frames}: must be >= 2")
    if num_frames <= trained_frames:
        return None
    if vrpr is None:
        p = derive_vrpr(num_frames, trained_frames)
    else:
        p = VRPRParams.from_mapping(vrpr)
    _check_vrpr(p, num_frames, trained_frames)
    return p


@functools.lru_cache(maxsize=256)
def _phi_table(num_frames: int, trained_frames: int, p: VRPRParams | None) -> tuple[int, ...]:
    if p is None:
        return tuple(range(num_frames))
    clip = trained_frames - 1 if p.clip is None else p.clip
    return tuple(min(phi_unclipped(d, p), clip) for d in range(num_frames))


def phi_table(num_frames: int, trained_frames: int, vrpr=None) -> torch.Tensor:
    """phi(d) for d in [0, F) as Long[F]."""
    p = resolve_vrpr(num_frames, trained_frames, vrpr)
    return torch.tensor(_phi_table(num_frames, trained_frames, p), dtype=torch.long)


def relative_positions(num_frames: int, trained_frames: int, vrpr=None) -> torch.Tensor:
    """Long[F, F]: signed re-encoded temporal offset of query frame a and key frame b (a - b if F <= T)."""
    phi = phi_table(num_frames, trained_frames, vrpr)
    f = torch.arange(num_frames)
    diff = f[:, None] - f[None, :]
    return torch.sign(diff) * phi[diff.abs()]


# ---------------------------------------------------------------------------------------------- TSA
@dataclasses.dataclass(frozen=True, kw_only=True)
class TSAParams:
    dense_frames: int = 8  # D1
    stripe_frames: int = 24  # D2
    stripe_width: int | None = None  # Ds in tokens; None = DESIGN 5 formula for the actual n
    sink_frames: tuple[int, ...] = (0,)

    @classmethod
    def from_mapping(cls, m) -> "TSAParams":
        if m is None:
            return cls()
        if isinstance(m, TSAParams):
            return m
        return cls(**_section_fields(m, "tsa", ("dense_frames", "stripe_frames", "stripe_width")))

    def check(self) -> None:
        if self.dense_frames < 0:
            raise PlanError(f"tsa.dense_frames={self.dense_frames}: must be >= 0")
        if self.stripe_frames < self.dense_frames:
            raise PlanError(f"tsa.stripe_frames={self.stripe_frames}: must be >= dense_frames={self.dense_frames}")
        if self.stripe_width is not None and self.stripe_width < 1:
            raise PlanError(f"tsa.stripe_width={self.stripe_width}: must be >= 1")
        if any(s < 0 for s in self.sink_frames):
            raise PlanError(f"tsa.sink_frames={list(self.sink_frames)}: frame indices must be >= 0")


def _section_fields(m, where: str, ints: tuple[str, ...], required: tuple[str, ...] = ()) -> dict:
    """Keyword arguments of a profile section (`tsa`, `long_range`): the integer fields `ints` (those in
    `required` must be given; another one given as None keeps its default) and an optional `sink_frames` list
    of integers; any other key is an error naming the allowed ones."""
    allowed = {*ints, "sink_frames"}
    unknown = set(m) - allowed
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    kwargs = {}
    for key in ints:
        if m.get(key) is None:
            if key in required:
                raise PlanError(f"{where}.{key}: missing")
            continue
        if not _is_int(m[key]):
            raise PlanError(f"{where}.{key}={m[key]!r}: must be an integer")
        kwargs[key] = m[key]
    if "sink_frames" in m:
        sinks = m["sink_frames"]
        if not isinstance(sinks, (list, tuple)) or not all(_is_int(x) for x in sinks):
            raise PlanError(f"{where}.sink_frames={sinks!r}: must be a list of integers")
        kwargs["sink_frames"] = tuple(sinks)
    return kwargs


def default_stripe_width(tokens_per_frame: int, dense_frames: int, stripe_frames: int) -> int:
    """Ds = floor((floor((D2-D1)/(D1/2)) / (D2-D1)) * n / 2), in exact integer arithmetic (195 at n=1560)."""
    span = stripe_frames - dense_frames
    if span == 0 or dense_frames == 0:
        return tokens_per_frame
    k = (2 * span) // dense_frames
    return max(1, (k * tokens_per_frame) // (2 * span))


# -------------------------------------------------------------------------------------- long range
@dataclasses.dataclass(frozen=True, kw_only=True)
class LongRangeParams:
    """A sparse long range for a dense (vrpr or full) layer: every key frame within band_frames of the query
    frame (exact, whole frames), and beyond it only the key frames b with b % stride_frames == 0 and the sink
    frames. Key frames are absolute (the same for every query), so a rank needs the band around its frames
    plus one shared set of F / stride_frames frames. Every attended pair is scored with phi."""

    band_frames: int  # B
    stride_frames: int  # S
    sink_frames: tuple[int, ...] = (0,)

    @classmethod
    def from_mapping(cls, m, where: str = "long_range") -> "LongRangeParams":
        if isinstance(m, LongRangeParams):
            return m
        if not isinstance(m, (dict,)) and not hasattr(m, "keys"):
            raise PlanError(f"{where}: must be a mapping with band_frames, stride_frames, optional sink_frames")
        fields = ("band_frames", "stride_frames")
        kwargs = _section_fields(m, where, fields, required=fields)
        if "sink_frames" in kwargs:
            kwargs["sink_frames"] = tuple(sorted(set(kwargs["sink_frames"])))
        p = cls(**kwargs)
        p.check(where)
        return p

    def check(self, where: str = "long_range") -> None:
        if self.band_frames < 0:
            raise PlanError(f"{where}.band_frames={self.band_frames}: must be >= 0")
        if self.stride_frames < 1:
            raise PlanError(f"{where}.stride_frames={self.stride_frames}: must be >= 1")
        if any(x < 0 for x in self.sink_frames):
            raise PlanError(f"{where}.sink_frames={list(self.sink_frames)}: frame indices must be >= 0")

    def key_frames(self, num_frames: int) -> tuple[int, ...]:
        """The absolute key frames (strided frames and sinks) of a video of num_frames latent frames."""
        strided = set(range(0, num_frames, self.stride_frames))
        return tuple(sorted(strided | {x for x in self.sink_frames if x < num_frames}))


def long_range_tiers(num_frames: int, p: LongRangeParams) -> torch.Tensor:
    """Long[F, F] tiers of a long-range layer: DENSE within the band, SINK on key frames beyond it."""
    f = torch.arange(num_frames)
    d = (f[:, None] - f[None, :]).abs()
    is_key = torch.zeros(num_frames, dtype=torch.bool)
    is_key[list(p.key_frames(num_frames))] = True
    tiers = torch.where(is_key[None, :], SINK, NONE)
    return torch.where(d <= p.band_frames, DENSE, tiers)


# --------------------------------------------------------------------------------------- layer plan
@dataclasses.dataclass(frozen=True)
class Group:
    """Keys [frame_start, frame_end) of one query frame that share one temporal-offset rule.

    offset None: the natural offset a - b (original RoPE on both sides); otherwise the fixed signed
    offset. banded: attended only where |s(i) - s(j)| < stripe_width. sink: tier SINK (TSA's sink frames,
    a long range's key frames beyond its band), so kernels can serve these frames apart.
    """

    frame_start: int
    frame_end: int
    offset: int | None
    banded: bool
    sink: bool = False


@dataclasses.dataclass(frozen=True, eq=False)  # identity hash: plans are cached singletons, keys of caches
class LayerPlan:
    """Frozen per-(kind, grid) plan. offsets/tiers are Long[F, F] frame tables."""

    kind: str
    grid: tuple[int, int, int]
    trained_frames: int
    offsets: torch.Tensor  # [F, F] signed temporal offset used for the pair
    tiers: torch.Tensor  # [F, F] NONE / DENSE / STRIPE / SINK
    stripe_width: int  # Ds in tokens (n when no stripes)
    groups: tuple[tuple[Group, ...], ...]  # per query frame, disjoint runs of key frames
    vrpr: VRPRParams | None
    tsa: TSAParams | None
    long_range: LongRangeParams | None = None  # set on a vrpr/full layer given a sparse long range (F > T)

    @property
    def label(self) -> str:
        """The kind as reports and byte counters name it: "vrpr+long" for a long-range vrpr layer."""
        return self.kind + ("+long" if self.long_range is not None else "")

    @property
    def num_frames(self) -> int:
        return self.grid[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def is_stock(self) -> bool:
        """True when the layer equals stock attention (kind full without long range, or F <= T)."""
        return self.kind == "full" and self.long_range is None

    def density(self) -> float:
        """Fraction of (query, key) token pairs attended."""
        n, ds = self.tokens_per_frame, min(self.stripe_width, self.tokens_per_frame)
        band_pairs = band_pair_count(n, ds)
        full = float((self.tiers == DENSE).sum() + (self.tiers == SINK).sum()) * n * n
        striped = float((self.tiers == STRIPE).sum()) * band_pairs
        return (full + striped) / float(self.num_frames * n) ** 2


def band_pair_count(n: int, width: int) -> float:
    """Pairs (i, j) in [0, n)^2 with |i - j| < width (1 <= width <= n), counted without an n x n table
    (at 16000x16000 pixels n is 10**6): the diagonal plus twice each off-diagonal of length n - k, k < width."""
    return float(n * (2 * width - 1) - width * (width - 1))


def layer_plan(kind: str, grid: Sequence[int], trained_frames: int, vrpr=None, tsa=None,
               long_range=None) -> LayerPlan:
    """Cached plan of one layer kind on a (F, H, W) token grid; vrpr/tsa/long_range are mappings or params.
    `long_range` applies to vrpr and full layers only (a tsa layer is already sparse)."""
    vrpr_params = None if vrpr is None else VRPRParams.from_mapping(vrpr)
    tsa_params = TSAParams.from_mapping(tsa)
    lr_params = None if long_range is None else LongRangeParams.from_mapping(long_range)
    return _layer_plan(kind, tuple(int(g) for g in grid), int(trained_frames), vrpr_params, tsa_params, lr_params)


@functools.lru_cache(maxsize=128)
def _layer_plan(kind, grid, trained_frames, vrpr, tsa, long_range=None) -> LayerPlan:
    if kind not in KINDS:
        raise PlanError(f"layer kind {kind!r}: must be one of {', '.join(KINDS)}")
    num_frames, h, w = grid
    if min(grid) < 1:
        raise PlanError(f"grid {grid}: every dimension must be >= 1")
    n = h * w
    vrpr_params = resolve_vrpr(num_frames, trained_frames, vrpr)
    tsa_params = tsa
    tsa_params.check()
    f = torch.arange(num_frames)
    natural = f[:, None] - f[None, :]
    if long_range is not None and kind == "tsa":
        raise PlanError("long_range: applies to vrpr and full layers only, not tsa")
    if vrpr_params is None:  # F <= T: nothing out of distribution, every layer is stock
        kind, long_range = "full", None
    if long_range is not None:
        # A long-range layer re-encodes every attended pair with phi whatever its base kind: beyond the band
        # the distances exceed R, which a full layer would leave out of the trained range.
        offsets = relative_positions(num_frames, trained_frames, vrpr_params)
        tiers = long_range_tiers(num_frames, long_range)
        stripe_width = n
    elif kind == "full":
        offsets = natural
        tiers = torch.full((num_frames, num_frames), DENSE, dtype=torch.long)
        stripe_width = n
    else:
        offsets = relative_positions(num_frames, trained_frames, vrpr_params)
        if kind == "vrpr":
            tiers = torch.full((num_frames, num_frames), DENSE, dtype=torch.long)
            stripe_width = n
        else:
            d = natural.abs()
            tiers = torch.where(d <= tsa_params.dense_frames, DENSE, NONE)
            tiers = torch.where((d > tsa_params.dense_frames) & (d <= tsa_params.stripe_frames), STRIPE, tiers)
            sinks = [s for s in tsa_params.sink_frames if s < num_frames]
            if sinks:
                is_sink = torch.zeros(num_frames, dtype=torch.bool)
                is_sink[sinks] = True
                tiers = torch.where(is_sink[None, :], SINK, tiers)
            stripe_width = tsa_params.stripe_width or default_stripe_width(
                n, tsa_params.dense_frames, tsa_params.stripe_frames
            )
            stripe_width = min(stripe_width, n)
            if stripe_width >= n:  # a band as wide as the frame is no band
                tiers = torch.where(tiers == STRIPE, DENSE, tiers)
    groups = _groups_of_rows(offsets, natural, tiers)
    return LayerPlan(
        kind=kind,
        grid=grid,
        trained_frames=trained_frames,
        offsets=offsets,
        tiers=tiers,
        stripe_width=stripe_width,
        groups=groups,
        vrpr=vrpr_params if kind != "full" or long_range is not None else None,
        tsa=tsa_params if kind == "tsa" else None,
        long_range=long_range,
    )


def _groups_of_rows(offsets, natural, tiers) -> tuple[tuple[Group, ...], ...]:
    """Per query frame, its attended key frames split into runs sharing (offset rule, banded, sink).

    Vectorised over the [F, F] tables: only run boundaries reach Python, so a plan at thousands of frames
    costs O(runs) Python steps, not O(F^2) (at 1026 frames the per-pair loop took ~7 s of a forward)."""
    num_frames = tiers.shape[0]
    natural_rule = 2 * num_frames + 1  # a sentinel no signed offset reaches: natural offsets are one rule
    rule = torch.where(offsets == natural, natural_rule, offsets)
    keys = torch.stack([rule, (tiers == STRIPE).long(), (tiers == SINK).long(), (tiers != NONE).long()], -1)
    change = torch.ones(num_frames, num_frames, dtype=torch.bool)
    change[:, 1:] = (keys[:, 1:] != keys[:, :-1]).any(-1)
    rows, starts = change.nonzero(as_tuple=True)  # row-major: each row's run starts in order
    rule_at, banded, sink, attended = keys[rows, starts].T.tolist()
    rows, starts = rows.tolist(), starts.tolist()
    out: list[list[Group]] = [[] for _ in range(num_frames)]
    for i, (a, b) in enumerate(zip(rows, starts)):
        if attended[i]:
            end = starts[i + 1] if i + 1 < len(rows) and rows[i + 1] == a else num_frames
            offset = None if rule_at[i] == natural_rule else rule_at[i]
            out[a].append(Group(b, end, offset, bool(banded[i]), bool(sink[i])))
    return tuple(tuple(g) for g in out)


# ------------------------------------------------------------------------------- token-level tables
def token_plan(kind: str, grid: Sequence[int], trained_frames: int, vrpr=None, tsa=None, long_range=None):
    """(mask Bool[L, L], offset Long[L, L]) of one layer on a small grid, frame-major token order;
    `long_range` (vrpr/full layers) gives the band + strided key frames + sinks pattern."""
    plan = layer_plan(kind, grid, trained_frames, vrpr, tsa, long_range)
    return expand_to_tokens(plan)


def expand_to_tokens(plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor]:
    num_frames, n = plan.num_frames, plan.tokens_per_frame
    f = torch.arange(num_frames).repeat_interleave(n)  # [L]
    s = torch.arange(n).repeat(num_frames)  # [L]
    tier = plan.tiers[f[:, None], f[None, :]]
    band = (s[:, None] - s[None, :]).abs() < plan.stripe_width
    mask = (tier == DENSE) | (tier == SINK) | ((tier == STRIPE) & band)
    offset = plan.offsets[f[:, None], f[None, :]]
    return mask, offset


__all__ = [
    "KINDS",
    "PlanError",
    "VRPRParams",
    "TSAParams",
    "LongRangeParams",
    "long_range_tiers",
    "LayerPlan",
    "Group",
    "derive_vrpr",
    "check_vrpr_params",
    "resolve_vrpr",
    "phi_table",
    "relative_positions",
    "default_stripe_width",
    "layer_plan",
    "token_plan",
    "expand_to_tokens",
]
