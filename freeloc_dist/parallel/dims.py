"""Process groups, made once at start-up: world = cfg_degree x sp_degree (DESIGN 7).

Rank layout: rank = cfg_rank * sp_degree + sp_rank, so the ranks of one sequence-parallel group are
contiguous (on one node when sp_degree <= GPUs per node) and a CFG pair spans the two halves.
Nothing else in the package calls new_group; layers get groups from here.
"""

from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

from .decisions import sp_degree_of


@dataclasses.dataclass
class ParallelDims:
    world_size: int
    rank: int
    cfg_degree: int
    sp_degree: int
    device: torch.device
    backend: str | None  # None: single process, no process group
    # How long a collective of this run's groups may wait before it fails every rank (parallel.timeout_s).
    timeout: datetime.timedelta = datetime.timedelta(seconds=600)
    # init_parallel made the default group (a library user's own group, made before, is left to them)
    owns_default_group: bool = False
    _sp_group: object = None
    _cfg_group: object = None
    _sub_sp_groups: dict = dataclasses.field(default_factory=dict)  # size -> this rank's sub-group

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_degree

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp_degree

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def sp_group(self):
        assert self.sp_degree > 1, "sp axis is disabled (sp_degree 1)"
        return self._sp_group

    @property
    def cfg_group(self):
        assert self.cfg_degree > 1, "cfg axis is disabled (cfg_degree 1)"
        return self._cfg_group

    def sub_sp_group(self, size: int):
        """This rank's group of `size` consecutive sp ranks (Ulysses inside a Ulysses x ring hybrid).

        Created on first request for a size, at install time, by every rank together (new_group is
        collective over the world); never from a forward.
        """
        assert self.sp_degree % size == 0, (size, self.sp_degree)
        if size not in self._sub_sp_groups:
            mine = None
            for c in range(self.cfg_degree):
                for g in range(self.sp_degree // size):
                    ranks = [c * self.sp_degree + g * size + j for j in range(size)]
                    group = dist.new_group(ranks, timeout=self.timeout)
                    if self.rank in ranks:
                        mine = group
            self._sub_sp_groups[size] = mine
        return self._sub_sp_groups[size]

    def sp_global_rank(self, sp_rank: int) -> int:
        """Global rank of a peer in this rank's sp group (p2p ops take global ranks)."""
        return self.cfg_rank * self.sp_degree + sp_rank



def init_parallel(*, cfg_degree: int = 1, timeout_s: float = 600.0) -> ParallelDims:
    """Read torchrun's environment, init the default group (unless the caller made one) and the cfg/sp groups.

    Every group gets `timeout_s`: torch's new_group otherwise gives a sub-group gloo's 30-minute default, so a
    rank stuck in a sequence-parallel collective would outwait parallel.timeout_s."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    sp_degree = sp_degree_of(world_size, cfg_degree)
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size == 1:
        return ParallelDims(1, 0, 1, 1, device, None)
    timeout = datetime.timedelta(seconds=timeout_s)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, timeout=timeout)
    dims = ParallelDims(world_size, rank, cfg_degree, sp_degree, device, backend, timeout, owns)
    # Every rank must create every group, in the same order.
    for c in range(cfg_degree):
        g = dist.new_group([c * sp_degree + s for s in range(sp_degree)], timeout=timeout)
        if c == dims.cfg_rank:
            dims._sp_group = g
    for s in range(sp_degree):
        g = dist.new_group([c * sp_degree + s for c in range(cfg_degree)], timeout=timeout)
        if s == dims.sp_rank:
            dims._cfg_group = g
    return dims


def destroy_parallel(dims: ParallelDims | None) -> None:
    """Destroy what init_parallel made: the default group when it made it, else only this run's own groups
    (a caller that made the default group, such as a test world serving many renders, keeps it)."""
    if dims is None or not dims.distributed or not dist.is_initialized():
        return
    if dims.owns_default_group:
        dist.destroy_process_group()
        return
    for group in (dims._sp_group, dims._cfg_group, *dims._sub_sp_groups.values()):
        if group is not None:
            dist.destroy_process_group(group)
    dims._sp_group, dims._cfg_group = None, None
    dims._sub_sp_groups.clear()
