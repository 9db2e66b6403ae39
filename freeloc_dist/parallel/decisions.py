"""Every parallel decision, one definition each: which world sizes work, which dense strategy a head count
allows, what each strategy costs in bytes, and which one a layer uses.

The engine (at run time), the dry-run planner, the process-group set-up and the launcher's preflight all
call these, so a plan printed by `--dry-run` is the plan the engine runs. Pure functions of shapes and
settings; no process group, no tensors but the frame tables of a LayerPlan.

Legend: P sp ranks, F latent frames, n tokens per frame, h heads, d head_dim, U Ulysses group size.
"""

from __future__ import annotations

import functools
import math

from ..choices import STRATEGY_CHOICES

CFG_DEGREES = (1, 2)


def ulysses_degree(heads: int, sp_degree: int) -> int:
    """Largest U dividing both the sp degree and the head count (1: no Ulysses possible)."""
    return max(u for u in range(1, sp_degree + 1) if sp_degree % u == 0 and heads % u == 0)


def dense_strategy(heads: int, sp_degree: int) -> str:
    """Dense layers: Ulysses if the heads divide over the ranks, else Ulysses x ring, else ring."""
    u = ulysses_degree(heads, sp_degree)
    return "ulysses" if u == sp_degree else ("hybrid" if u > 1 else "ring")


def sp_degree_of(world_size: int, cfg_degree: int) -> int:
    """sp_degree for a world size and cfg degree, or ValueError naming the problem."""
    if cfg_degree not in CFG_DEGREES:
        raise ValueError(f"parallel.cfg_degree={cfg_degree}: must be 1 or 2")
    if world_size < 1:
        raise ValueError(f"world size {world_size}: must be >= 1")
    if world_size % cfg_degree:
        raise ValueError(f"parallel.cfg_degree={cfg_degree}: does not divide the world size {world_size}")
    return world_size // cfg_degree


def check_world(world_size: int, *, cfg_degree: int, latent_frames: int, strategy: str = "auto",
                heads: int | None = None, guidance_scale: float | None = None) -> int:
    """Whether a render can run on `world_size` ranks; returns sp_degree or raises ValueError (one line).

    `heads` None skips the head-count checks (the model's config is not known yet); `guidance_scale` None
    skips the CFG check."""
    sp = sp_degree_of(world_size, cfg_degree)
    if cfg_degree == 2 and guidance_scale is not None and guidance_scale <= 1.0:
        raise ValueError("parallel.cfg_degree=2: needs sampling.guidance_scale > 1 (no unconditional pass otherwise)")
    if sp > latent_frames:
        raise ValueError(f"{world_size} ranks give {sp} sequence-parallel ranks but the video has only "
                         f"{latent_frames} latent frames; use more frames or fewer ranks")
    check_strategy(strategy, heads, sp)
    return sp


def check_strategy(strategy: str, heads: int | None, sp_degree: int, *, degenerate_hybrid: bool = False) -> None:
    """Whether a (possibly forced) strategy can run `heads` heads on `sp_degree` ranks; `heads` None: name only.

    Ulysses needs the heads to divide. A hybrid whose heads and ranks share no factor runs, as plain ring (U =
    1): the engine accepts it (`degenerate_hybrid`, tests force every strategy), a user asking for it is told."""
    if strategy not in STRATEGY_CHOICES:
        raise ValueError(f"parallel.strategy={strategy!r}: choose one of {', '.join(STRATEGY_CHOICES)}")
    if heads and sp_degree > 1:
        if strategy == "ulysses" and heads % sp_degree:
            raise ValueError(f"parallel.strategy=ulysses: {heads} heads do not divide over {sp_degree} ranks; "
                             f"use auto or ring")
        if strategy == "hybrid" and math.gcd(heads, sp_degree) == 1 and not degenerate_hybrid:
            raise ValueError(f"parallel.strategy=hybrid: {heads} heads and {sp_degree} ranks share no factor; "
                             f"use auto or ring")


def received_elements(strategy: str, plan, shards, heads: int, head_dim: int) -> list[int]:
    """Elements each sp rank receives for one layer under a strategy (the byte model of DESIGN 7)."""
    from .shards import exchange_plan

    n, num_ranks = plan.tokens_per_frame, len(shards.ranges)
    frame = n * heads * head_dim  # one frame of one tensor
    sizes = shards.sizes
    if strategy == "neighbour":
        ex = exchange_plan(plan, shards)
        return [2 * ex.frames_received(r) * frame for r in range(num_ranks)]
    if strategy == "ring":
        return [2 * (shards.num_frames - sizes[r]) * frame for r in range(num_ranks)]
    if strategy == "hybrid":
        u = ulysses_degree(heads, num_ranks)
        per_head_group = frame // u
        out = []
        for r in range(num_ranks):
            first = r - r % u
            group = sum(sizes[first : first + u])
            ulysses_part = 3 * (group - sizes[r]) + sizes[r] * (u - 1)
            out.append((ulysses_part + 2 * (shards.num_frames - group)) * per_head_group)
        return out
    if strategy == "ulysses":
        # q, k, v in: other ranks' tokens of my heads; out back: my tokens of other ranks' heads.
        per_head_group = frame // num_ranks
        return [
            (3 * (shards.num_frames - sizes[r]) + sizes[r] * (num_ranks - 1)) * per_head_group
            for r in range(num_ranks)
        ]
    raise ValueError(f"unknown strategy {strategy!r}")


@functools.lru_cache(maxsize=256)
def layer_strategy(plan, shards, heads: int, head_dim: int, forced: str = "auto") -> str:
    """The strategy a layer runs: `forced` unless auto; else the cheapest by bytes received (worst rank)
    among the dense strategy and, for sparse layers (TSA, and dense layers given a long range: band, key frames,
    sinks), neighbour exchange (ties go to neighbour exchange)."""
    if forced != "auto":
        return forced
    candidates = [dense_strategy(heads, len(shards.ranges))]
    if plan.kind == "tsa" or plan.long_range is not None:
        candidates.append("neighbour")
    cost = {c: max(received_elements(c, plan, shards, heads, head_dim)) for c in candidates}
    return min(candidates, key=lambda c: (cost[c], c != "neighbour"))
