"""Where a render's weights wait (config `memory:`): the text encoder, the idle expert, sharded blocks.

None of these settings changes a number of the render (the resume fingerprint ignores them); each only decides
what sits on the render device when:
- `text_encoder: gpu | cpu | rank0`: where prompts are encoded. gpu: on the render device; cpu: on the host (the
  encoder never touches the device); rank0: rank 0 encodes on its device and broadcasts the embeddings over the
  world, and the other ranks never load the encoder. After a job's prompts are encoded the encoder leaves the
  device: it is freed, or (a prompt queue, which encodes again for the next job) kept in host memory.
- `experts: resident | offload`: with offload the idle expert of a two-expert model (Wan2.2 A14B) waits in host
  memory (pinned under CUDA) and the two swap places tensor by tensor when the schedule crosses the boundary (once
  per render; `ExpertSwap`). A one-expert model has no idle expert: nothing moves.
- `shard_weights`: the transformer's blocks sharded over the sp group with FSDP2 (freeloc_dist.parallel.fsdp).
Which components are text encoders and experts, and what the blocks are, is the family's (freeloc_dist.families).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .errors import UserError


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a family's loader puts the weights (freeloc_dist.families.base.Family.load_components)."""

    transformer: torch.device  # the first expert (the host when its blocks are sharded after loading)
    idle_expert: torch.device  # a second expert
    text_encoder: torch.device | None  # None: not loaded on this rank


def experts_setting(memory) -> str:
    """`memory.experts`, its default resolved: offload, or resident when the blocks are sharded."""
    from .memory_plan import settings_of

    return settings_of(memory).experts


def check_memory(cfg, two_experts: bool | None) -> None:
    """The combinations not supported, one line each, before any weight loads (every rank: same inputs)."""
    m = cfg.memory
    offload = "memory.experts=offload" + (" (the default for two experts)" if m.experts is None else "")
    moves = [(what, fix) for what, on, fix in (
        (offload, experts_setting(m) == "offload" and two_experts, "memory.experts: resident"),
        ("memory.shard_weights=true", m.shard_weights, "memory.shard_weights: false")) if on]
    if len(moves) == 2:
        raise UserError("memory.experts=offload with memory.shard_weights=true: not supported together (sharded "
                        "experts already hold 1/sp of their weights each); set memory.experts: resident")
    if moves and cfg.model.compile != "none":
        what, fix = moves[0]
        raise UserError(f"{what} with model.compile={cfg.model.compile}: not supported together (compiled "
                        f"graphs are not tested over moved or sharded weights); set {fix}, or model.compile: none")


def placement(cfg, dims, two_experts: bool) -> Placement:
    """This rank's placement of the weights under `cfg.memory`."""
    m, host = cfg.memory, torch.device("cpu")
    if m.text_encoder == "cpu":
        text = host
    elif m.text_encoder == "rank0" and dims.rank != 0:
        text = None
    else:
        text = dims.device
    sharded = m.shard_weights and dims.sp_degree > 1
    offload = experts_setting(m) == "offload" and two_experts
    return Placement(transformer=host if sharded else dims.device,
                     idle_expert=host if (sharded or offload) else dims.device, text_encoder=text)


class PromptEncoder:
    """Encodes a job's prompts where `memory.text_encoder` says, returns them on the render device, and sends the
    encoder off the device afterwards: freed, or kept on the host when `keep` (a queue encodes again)."""

    def __init__(self, setting: str, dims, comm, keep: bool):
        self.setting, self.dims, self.comm, self.keep = setting, dims, comm, keep

    def __call__(self, components, prompts: list[str], max_tokens: int) -> list[torch.Tensor]:
        if self.setting == "rank0" and self.dims.distributed:
            here = self._encode(components, prompts, max_tokens) if self.dims.rank == 0 else [None] * len(prompts)
            return [self.comm.broadcast(e, tag="prompts") for e in here]
        return self._encode(components, prompts, max_tokens)

    def _encode(self, components, prompts, max_tokens) -> list[torch.Tensor]:
        from .families import family_of

        family = family_of(components.transformer)
        where = torch.device("cpu") if self.setting == "cpu" else self.dims.device
        encoders = [getattr(components, name) for name in family.text_encoder_fields]
        if any(e is None for e in encoders):
            raise RuntimeError("the text encoder was freed after the last job; a queue keeps it (keep=True)")
        for encoder in encoders:
            encoder.to(where)
        embeds = [family.encode_prompt(components, p, max_tokens).to(self.dims.device) for p in prompts]
        for name, encoder in zip(family.text_encoder_fields, encoders):
            if self.keep:
                encoder.to("cpu")
            else:
                setattr(components, name, None)
        return embeds


class ExpertSwap:
    """The idle expert of a two-expert model in host memory; `use(transformer)` puts that expert on the device.

    The experts have the same parameters (names and shapes: the model kind checks it), so they swap tensor by tensor
    through one staging buffer on the device (per dtype, the size of the largest tensor): the idle expert's host
    tensor goes to the stage, the active expert's device tensor to that host tensor, the stage into the device
    tensor, and the two parameters exchange tensors. At any moment the device holds one expert plus the stage, the
    host one expert, and no tensor is allocated or freed after the first swap. Buffers (RoPE tables) stay put."""

    def __init__(self, experts: list, device: torch.device):
        first, second = experts
        self.experts, self.device, self.active = (first, second), device, 0
        a, b = dict(first.named_parameters()), dict(second.named_parameters())
        if list(a) != list(b) or any(a[n].shape != b[n].shape or a[n].dtype != b[n].dtype for n in a):
            raise UserError("memory.experts=offload: the two experts' parameters differ; set memory.experts: resident")
        self.pairs = [(a[n], b[n]) for n in a]
        self.stage: dict[torch.dtype, torch.Tensor] = {}
        self.swaps, self.bytes_moved = 0, 0
        if device.type == "cuda":  # pinned: the copies run at full bus speed
            for _, p in self.pairs:
                p.data = p.data.pin_memory()

    def use(self, transformer) -> None:
        index = 0 if transformer is self.experts[0] else 1
        assert transformer is self.experts[index], "not one of the swapped experts"
        if index == self.active:
            return
        with torch.inference_mode(False), torch.no_grad():  # plain tensors: usable outside inference mode
            for pair in self.pairs:
                active, idle = pair if self.active == 0 else pair[::-1]
                on_device, host = active.data, idle.data
                stage = self._stage(on_device)
                stage.copy_(host)
                host.copy_(on_device)
                on_device.copy_(stage)
                active.data, idle.data = host, on_device
                self.bytes_moved += 2 * host.numel() * host.element_size()
        self.active, self.swaps = index, self.swaps + 1

    def _stage(self, like: torch.Tensor) -> torch.Tensor:
        if like.dtype not in self.stage:
            largest = max(p.numel() for p, _ in self.pairs if p.dtype == like.dtype)
            self.stage[like.dtype] = torch.empty(largest, dtype=like.dtype, device=self.device)
        return self.stage[like.dtype][:like.numel()].view_as(like)

    def wrap(self, predict):
        """`predict` (freeloc_dist.sampling.PredictFn) that first puts its transformer on the device."""
        if predict is None:
            return None

        def run(transformer, *args, **kwargs):
            self.use(transformer)
            return predict(transformer, *args, **kwargs)
        return run


@dataclasses.dataclass
class MemorySetup:
    """What a Session installed for `memory:` (render.Session keeps it for every job)."""

    encoder: PromptEncoder
    swap: ExpertSwap | None = None
    sharded: list[Any] = dataclasses.field(default_factory=list)  # parallel.fsdp.ShardedWeights per transformer

    def wrap(self, predict):
        return self.swap.wrap(predict) if self.swap is not None else predict


def load_placed(cfg, dims):
    """The model's components, each where `cfg.memory` puts it on this rank (text encoder, idle expert)."""
    from .family import read_model_kind
    from .models import load_components

    two = read_model_kind(cfg.model.path).two_experts
    return load_components(cfg.model.path, cfg.model.dtype, dims.device, placement(cfg, dims, two))


def install(cfg, parts, dims, comm, log_fn, *, keep_text_encoder: bool) -> MemorySetup:
    """After FreeLOC and the parallel engine are installed: shard the blocks or set up the expert swap."""
    from .families import family_of

    setup = MemorySetup(PromptEncoder(cfg.memory.text_encoder, dims, comm, keep_text_encoder))
    experts = parts.experts()
    if cfg.memory.shard_weights:
        if dims.sp_degree == 1:
            log_fn("warning: memory.shard_weights=true has no effect with one sequence-parallel rank (whole weights)")
        else:
            from .parallel.fsdp import shard_weights

            family = family_of(parts.transformer)
            setup.sharded = [shard_weights(t, family.weight_blocks(t), dims, comm) for t in experts]
            log_fn(f"memory: transformer blocks sharded over {dims.sp_degree} ranks (FSDP2)")
    elif experts_setting(cfg.memory) == "offload" and len(experts) == 2:
        setup.swap = ExpertSwap(experts, dims.device)
        log_fn("memory: the idle expert waits in host memory" + (" (pinned)" if dims.device.type == "cuda" else ""))
    return setup
