"""The only module that calls torch.distributed collectives; every call counts the bytes it receives.

Counting received bytes (excluding data a rank keeps) matches DESIGN 7's per-rank figures:
ring 2(P-1)s, Ulysses 4(P-1)/P s, neighbour exchange <= 2(2 D2 + sinks) frames of one tensor.
"""

from __future__ import annotations

import collections
import dataclasses

import torch
import torch.distributed as dist


class Comm:
    def __init__(self, dims):
        self.dims = dims
        self.bytes = collections.Counter()  # tag -> bytes received by this rank

    def reset(self):
        self.bytes.clear()

    def _count(self, tag, num_bytes):
        self.bytes[tag] += int(num_bytes)

    # -- sp axis ------------------------------------------------------------------------------
    def all_to_all(
        self, chunks: list[torch.Tensor], out_shapes: list[tuple], tag: str, sub_group_size: int | None = None
    ) -> list[torch.Tensor]:
        """chunks[j] goes to rank j of the sp group (or of this rank's sub-group of `sub_group_size`
        consecutive sp ranks); returns the tensors received from each of them (given shapes)."""
        if sub_group_size is None or sub_group_size == self.dims.sp_degree:
            group, me = self.dims.sp_group, self.dims.sp_rank
        else:
            group, me = self.dims.sub_sp_group(sub_group_size), self.dims.sp_rank % sub_group_size
        send = torch.cat([c.reshape(-1) for c in chunks])
        out = torch.empty(sum(_numel(s) for s in out_shapes), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(
            out, send, [_numel(s) for s in out_shapes], [c.numel() for c in chunks], group=group
        )
        self._count(tag, sum(_numel(s) for j, s in enumerate(out_shapes) if j != me) * send.element_size())
        return [t.view(s) for t, s in zip(out.split([_numel(s) for s in out_shapes]), out_shapes)]

    def exchange(self, sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, tuple, torch.dtype]], tag: str):
        """Batched point-to-point on the sp axis: sends (sp_rank, tensor), recvs (sp_rank, shape, dtype).

        Returns (received tensors, a wait() callable): compute on local data between the two.
        """
        device = self.dims.device
        bufs = [torch.empty(shape, dtype=dtype, device=device) for _, shape, dtype in recvs]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.dims.sp_global_rank(r)) for r, t in sends]
        ops += [dist.P2POp(dist.irecv, b, self.dims.sp_global_rank(r)) for (r, _, _), b in zip(recvs, bufs)]
        reqs = dist.batch_isend_irecv(ops) if ops else []
        self._count(tag, sum(b.numel() * b.element_size() for b in bufs))

        def wait():
            for req in reqs:
                req.wait()
            return bufs

        return bufs, wait

    def gather_frames(self, local: torch.Tensor, sizes: list[int], dim: int, tag: str) -> torch.Tensor:
        """All-gather shards of uneven size along `dim` over the sp axis (used for final latents)."""
        if self.dims.sp_degree == 1:
            return local
        shape = list(local.shape)
        parts = []
        for s in sizes:
            shape[dim] = s
            parts.append(torch.empty(shape, dtype=local.dtype, device=local.device))
        max_shape = list(local.shape)
        max_shape[dim] = max(sizes)
        padded = torch.zeros(max_shape, dtype=local.dtype, device=local.device)
        padded.narrow(dim, 0, local.shape[dim]).copy_(local)
        gathered = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(gathered, padded, group=self.dims.sp_group)
        me = self.dims.sp_rank
        self._count(tag, sum(g.numel() for j, g in enumerate(gathered) if j != me) * local.element_size())
        return torch.cat([g.narrow(dim, 0, s) for g, s in zip(gathered, sizes)], dim=dim)

    # -- cfg axis -----------------------------------------------------------------------------
    def sp_sum(self, values: torch.Tensor, tag: str) -> torch.Tensor:
        """The sum over the sp group of a few numbers (a cache's decision statistics), on every sp rank."""
        total = values.to(self.dims.device).contiguous()
        dist.all_reduce(total, group=self.dims.sp_group)
        self._count(tag, total.numel() * total.element_size() * (self.dims.sp_degree - 1))
        return total

    def cfg_all_gather(self, local: torch.Tensor, tag: str = "cfg") -> list[torch.Tensor]:
        """[tensor of cfg rank 0, tensor of cfg rank 1]."""
        parts = [torch.empty_like(local) for _ in range(self.dims.cfg_degree)]
        dist.all_gather(parts, local.contiguous(), group=self.dims.cfg_group)
        self._count(tag, local.numel() * local.element_size() * (self.dims.cfg_degree - 1))
        return parts

    # -- world --------------------------------------------------------------------------------
    def broadcast(self, value, tag: str):
        """Rank 0's `value` on every rank of the world, on this rank's device (the other ranks pass None): a tensor
        of up to 4 dims (floating, integer or bool), or a dataclass whose fields are such tensors (a family's text
        conditioning: every field, masks with their dtype, tensors with no elements included). The dataclass's type
        travels first, then each tensor's shape and dtype (none of these counted), then its values."""
        holder = [type(value) if self.dims.rank == 0 else None]
        dist.broadcast_object_list(holder, src=0, device=self.dims.device)
        kind = holder[0]
        if not dataclasses.is_dataclass(kind):
            return self._broadcast_tensor(value, tag)
        return kind(**{f.name: self._broadcast_tensor(getattr(value, f.name) if self.dims.rank == 0 else None, tag)
                       for f in dataclasses.fields(kind)})

    def _broadcast_tensor(self, tensor: torch.Tensor | None, tag: str) -> torch.Tensor:
        header = torch.zeros(6, dtype=torch.int64, device=self.dims.device)
        if self.dims.rank == 0:
            assert isinstance(tensor, torch.Tensor) and tensor.ndim <= 4 and tensor.dtype in _BROADCAST_DTYPES, tensor
            header[0], header[1] = tensor.ndim, _BROADCAST_DTYPES.index(tensor.dtype)
            header[2:2 + tensor.ndim] = torch.tensor(tensor.shape)
        dist.broadcast(header, src=0)
        ndim, dtype = int(header[0]), _BROADCAST_DTYPES[int(header[1])]
        if self.dims.rank == 0:
            out = tensor.to(self.dims.device).contiguous()
        else:
            out = torch.empty(header[2:2 + ndim].tolist(), dtype=dtype, device=self.dims.device)
        if out.numel():  # every rank knows the shape: an empty tensor (no glyph text) sends nothing
            dist.broadcast(out, src=0)
        if self.dims.rank != 0:
            self._count(tag, out.numel() * out.element_size())
        return out

    def count(self, tag: str, num_bytes: float) -> None:
        """Count bytes a torch library received on one of our groups for us (FSDP2's all-gathers: parallel.fsdp)."""
        self._count(tag, num_bytes)

    def any_flag(self, flag: bool) -> bool:
        """True on every rank iff any rank passes True (e.g. a preemption signal seen by one rank)."""
        if not self.dims.distributed:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.dims.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def same_on_every_rank(self, values: torch.Tensor) -> bool:
        """Whether `values` (a few numbers) are bitwise the same on every rank of the world (not counted)."""
        if not self.dims.distributed:
            return True
        parts = [torch.empty_like(values) for _ in range(self.dims.world_size)]
        dist.all_gather(parts, values.contiguous())
        return all(torch.allclose(p, parts[0], rtol=0, atol=0, equal_nan=True) for p in parts)

    def send(self, tensor: torch.Tensor, dst: int, tag: str) -> None:
        """Blocking send of `tensor` to global rank `dst` (on the process group's device)."""
        dist.send(tensor.to(self.dims.device).contiguous(), dst)

    def recv(self, shape: tuple, dtype: torch.dtype, src: int, tag: str) -> torch.Tensor:
        """Blocking receive of a tensor of known shape and dtype from global rank `src` (returned on CPU)."""
        buf = torch.empty(shape, dtype=dtype, device=self.dims.device)
        dist.recv(buf, src)
        self._count(tag, buf.numel() * buf.element_size())
        return buf.cpu()

    def gather_counts(self) -> list[dict]:
        """Every rank's byte counters, on every rank (for reports; not itself counted)."""
        if not self.dims.distributed:
            return [dict(self.bytes)]
        out = [None] * self.dims.world_size
        dist.all_gather_object(out, dict(self.bytes))
        return out


_BROADCAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.bool)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
