"""What each `memory:` setting keeps on the render device, in host memory, and what it moves: the dry-run
planner's part of freeloc_dist.memory (torch-free, numbers only).

Per rank, for a model of P transformer parameters with blocks of B_1 .. B_L parameters (the family's
`weight_block_params`: one model's blocks may differ in size), S = B_1 + .. + B_L, b bytes per parameter,
E experts (1, or 2 for Wan2.2 A14B), a text encoder of T parameters and sp sequence-parallel ranks:
  one expert on the device       whole: P b;  shard_weights: (P - S + S / sp) b, plus one gathered block, the
                                 largest: max B_i b (a block is gathered for its forward and freed after)
  the second expert              resident: as the first;  offload: none on the device, P b in host memory
                                 (swapped once per render: 2 P b over the host link)
  text encoder                   gpu / rank0: T b on the device while the prompts are encoded, then freed (the
                                 peak is the larger of encoding and sampling); cpu: T b in host memory;
                                 rank0 (rank 0 is the worst rank): the others receive each prompt's text
                                 conditioning (at most the family's `prompt_bytes` each, once per job) and never
                                 hold the encoder
  FSDP2 all-gathers              (sp - 1) / sp x S b received per transformer pass (FSDP pads each tensor's
                                 rows to a multiple of sp: the run's count, parallel.fsdp, is a little higher)
"""

from __future__ import annotations

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class MemorySettings:
    text_encoder: str  # gpu | cpu | rank0
    experts: str  # resident | offload (resolved: freeloc_dist.memory.experts_setting)
    shard_weights: bool

    def describe(self, two_experts: bool = True) -> str:
        experts = f"experts={self.experts}, " if two_experts else ""
        return f"text_encoder={self.text_encoder}, {experts}shard_weights={'true' if self.shard_weights else 'false'}"


def settings_of(memory) -> MemorySettings:
    """The settings of a config's `memory:` section, defaults resolved."""
    experts = memory.experts if memory.experts is not None else ("resident" if memory.shard_weights else "offload")
    return MemorySettings(memory.text_encoder, experts, memory.shard_weights)


# What --gpu-memory-gb tries when the configured settings do not fit, cheapest in traffic first (rank0 is not
# among them: rank 0, the worst rank, holds the encoder as with gpu).
CANDIDATES = (
    MemorySettings("gpu", "resident", False),
    MemorySettings("gpu", "offload", False),
    MemorySettings("cpu", "offload", False),
    MemorySettings("gpu", "resident", True),
    MemorySettings("cpu", "resident", True),
)


@dataclasses.dataclass
class WeightPlan:
    device: dict[str, float]  # weights on the device while sampling
    encoding: float  # the text encoder on the device while the prompts are encoded (freed before sampling)
    host: dict[str, float]  # host memory the settings add
    per_step: dict[str, float]  # bytes received per step (FSDP2 all-gathers)
    per_job: dict[str, float]  # bytes moved once per render (expert swap, prompt broadcast)


def plan_weights(s: MemorySettings, *, transformer_params: float, block_params: Sequence[float], experts: int,
                 text_encoder_params: float, dtype_bytes: int, sp: int, passes: int, prompts: int,
                 prompt_bytes: float, world: int) -> WeightPlan:
    """The weight lines of one rank (the worst: rank 0) under settings `s` (formulas: the module docstring);
    `block_params`: the parameters of each sharded block, in forward order."""
    whole = transformer_params * dtype_bytes
    sharded = s.shard_weights and sp > 1
    blocks = sum(block_params)
    one = (transformer_params - blocks + blocks / sp) * dtype_bytes if sharded else whole
    device, host, per_step, per_job = {"weights: transformer": one}, {}, {}, {}
    if experts == 2:
        if s.experts == "offload" and not sharded:
            host["idle expert (transformer_2)"] = whole
            per_job["expert swap (host <-> device)"] = 2 * whole
        else:
            device["weights: transformer_2"] = one
    if sharded:
        device["weights: gathered block"] = max(block_params) * dtype_bytes
        per_step["weights"] = (sp - 1) / sp * blocks * dtype_bytes * passes
    encoder = text_encoder_params * dtype_bytes
    encoding = 0.0
    if s.text_encoder == "cpu":
        host["text encoder"] = encoder
    else:
        encoding = encoder
    if s.text_encoder == "rank0" and world > 1:
        per_job["prompt embeddings (rank 0 broadcast)"] = prompts * prompt_bytes
    return WeightPlan(device, encoding, host, per_step, per_job)


def peak(device: dict[str, float], encoding: float) -> float:
    """Device bytes at the worst moment: sampling (every line), or encoding (the weights and the text encoder)."""
    weights = sum(v for k, v in device.items() if k.startswith("weights"))
    return max(sum(device.values()), weights + encoding)
