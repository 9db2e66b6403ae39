"""Weights sharded over the sequence-parallel group with PyTorch FSDP2 (`memory.shard_weights`).

Each of the transformer's repeated blocks (the family's `weight_blocks`) becomes its own `fully_shard` unit on
the sp group's mesh: every sp rank keeps 1/sp of the block's weights (dim 0 of each tensor, padded to a multiple
of sp), the block's pre-forward all-gathers them and its post-forward frees the gathered copy, so at most one
block is whole at a time. Each block is its own FSDP root; `reshard_after_forward=True` is passed explicitly
because FSDP2 keeps a root's weights gathered after its forward when the argument is left to its default. The
rest of the transformer (embeddings, head: about 2% of Wan2.1-14B) stays whole on every rank. Values are the
same: the all-gather copies the bytes back into the same layout.

The all-gathers are FSDP's own collectives on our group (made by freeloc_dist.parallel.dims); the bytes each rank
receives are counted under "weights" through Comm.count at every block forward that finds the block sharded (so
FSDP gathers it), from the shard layout (`gathered_bytes`): what `--report-comm` shows and the planner predicts.
"""

from __future__ import annotations

import math

import torch

TAG = "weights"


def gathered_bytes(block: torch.nn.Module, sp_degree: int) -> int:
    """Bytes one rank receives when a block of whole tensors sharded over `sp_degree` ranks is all-gathered:
    (sp - 1) shards of ceil(rows / sp) rows of every tensor (FSDP2 pads dim 0 to a multiple of sp)."""
    total = 0
    for p in block.parameters():
        rows = p.shape[0] if p.ndim else 1
        per_row = math.prod(p.shape[1:]) if p.ndim else 1
        total += math.ceil(rows / sp_degree) * per_row * p.element_size() * (sp_degree - 1)
    return total


def is_sharded(block: torch.nn.Module) -> bool:
    """Whether the block holds only its shards (FSDP2 registers DTensor parameters then, plain ones when whole)."""
    from torch.distributed.tensor import DTensor

    return all(isinstance(p, DTensor) for p in block.parameters())


class ShardedWeights:
    """The FSDP2 units of one transformer; `remove()` takes the counting hooks off."""

    def __init__(self, blocks, dims, comm):
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.fsdp import fully_shard

        mesh = DeviceMesh.from_group(dims.sp_group, dims.device.type)
        self.blocks = list(blocks)
        self.bytes_per_forward = 0
        self._hooks = []
        for block in self.blocks:
            received = gathered_bytes(block, dims.sp_degree)  # of the whole tensors, before they are sharded
            self.bytes_per_forward += received
            fully_shard(block, mesh=mesh, reshard_after_forward=True)  # moves the block to the mesh's device

            def count(module, args, received=received):
                if is_sharded(module):  # FSDP2 all-gathers it now (a block left whole would not be)
                    comm.count(TAG, received)

            self._hooks.append(block.register_forward_pre_hook(count, prepend=True))  # before FSDP2 gathers

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def shard_weights(transformer, blocks, dims, comm) -> ShardedWeights:
    """Shard `blocks` (the transformer's repeated blocks) over the sp group and move the transformer's other
    weights to this rank's device (the loader left the transformer on the host so that no rank ever holds all of
    its blocks on the device: FSDP2 moves one block at a time)."""
    ids = {id(p) for block in blocks for p in block.parameters()}
    for p in transformer.parameters():
        if id(p) not in ids:
            p.data = p.data.to(dims.device)
    for module in transformer.modules():
        for name, buf in module.named_buffers(recurse=False):
            if buf is not None and buf.device != dims.device:
                setattr(module, name, buf.to(dims.device))
    return ShardedWeights(blocks, dims, comm)
