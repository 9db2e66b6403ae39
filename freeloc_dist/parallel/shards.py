"""Frame shards and communication lists: shapes in, frozen plans out, cached per shape.

Each sp rank owns a contiguous range of latent frames; ranges differ by at most one frame (the
first F mod P ranks get one more). Which key frames a rank needs comes from the layer plan itself
(the union of the frames its queries attend), so the exchange lists follow TSA's tiers exactly.
"""

from __future__ import annotations

import dataclasses
import functools

from ..plan import NONE, LayerPlan, balanced_ranges


@dataclasses.dataclass(frozen=True)
class FrameShards:
    num_frames: int
    ranges: tuple[tuple[int, int], ...]  # [start, end) per sp rank

    @property
    def sizes(self) -> list[int]:
        return [e - s for s, e in self.ranges]


@functools.lru_cache(maxsize=64)
def frame_shards(num_frames: int, sp_degree: int) -> FrameShards:
    if sp_degree > num_frames:
        raise ValueError(
            f"{num_frames} latent frames cannot be split over {sp_degree} sequence-parallel ranks; "
            f"use at most {num_frames} ranks or a longer video"
        )
    return FrameShards(num_frames, balanced_ranges(num_frames, sp_degree))


@dataclasses.dataclass(frozen=True)
class ExchangePlan:
    """For one layer plan and shard layout: what every rank sends to / receives from every other."""

    needed: tuple[tuple[int, ...], ...]  # per rank: sorted key frames its queries attend
    sends: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...]  # per rank: (dst, frames) it sends
    recvs: tuple[tuple[tuple[int, tuple[int, ...]], ...], ...]  # per rank: (src, frames) it receives

    def frames_received(self, rank: int) -> int:
        return sum(len(f) for _, f in self.recvs[rank])


@functools.lru_cache(maxsize=64)
def exchange_plan(plan: LayerPlan, shards: FrameShards) -> ExchangePlan:
    num_ranks = len(shards.ranges)
    attended = plan.tiers != NONE  # [F, F]
    needed = []
    for s, e in shards.ranges:
        cols = attended[s:e].any(dim=0).nonzero().flatten().tolist()
        needed.append(tuple(cols))
    sends = [[] for _ in range(num_ranks)]
    recvs = [[] for _ in range(num_ranks)]
    for dst in range(num_ranks):
        for src in range(num_ranks):
            if src == dst:
                continue
            s, e = shards.ranges[src]
            frames = tuple(f for f in needed[dst] if s <= f < e)
            if frames:
                sends[src].append((dst, frames))
                recvs[dst].append((src, frames))
    return ExchangePlan(tuple(needed), tuple(map(tuple, sends)), tuple(map(tuple, recvs)))
