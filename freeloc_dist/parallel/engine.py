"""parallelize(): install sequence and CFG parallelism on a built Wan transformer.

The model code stays stock. Three hooks carry everything: the FreeLOC processors' attention function
(replaced by a distributed one), a forward hook on `transformer.rope` (each rank gets the rows of the
whole video's RoPE table for its own frames) and a pre-hook that records the global token grid. The
engine's `predict` has the sampler's contract: global latents in, global guided prediction out; in
between, each rank runs the transformer on its frames only.
"""

from __future__ import annotations

import functools

import torch

from ..attention import get_backend
from ..install import apply_freeloc
from ..plan import LayerPlan
from ..processor import grid_of
from .comm import Comm
from .dims import ParallelDims
from .shards import FrameShards, frame_shards, received_elements
from .strategies import STRATEGIES, SPContext, ulysses_degree


def stock_profile(num_layers: int) -> dict:
    """Every layer full at any length: the engine's path for renders without FreeLOC."""
    return {
        "model": "stock",
        "trained_frames": 1 << 30,
        "source": "stock attention (no FreeLOC profile)",
        "layers": {"full": list(range(num_layers))},
    }


class SequenceParallel:
    def __init__(self, transformer, dims: ParallelDims, *, backend: str = "sdpa", strategy: str = "auto"):
        if strategy not in ("auto", *STRATEGIES):
            raise ValueError(f"parallel.strategy={strategy!r}: choose auto, {', '.join(STRATEGIES)}")
        self.transformer = transformer
        self.dims = dims
        self.comm = Comm(dims)
        self.backend = backend
        self.strategy = strategy
        self.num_frames: int | None = None  # global latent frames of the current render
        state = getattr(transformer, "freeloc_state", None)
        if state is None:
            apply_freeloc(transformer, stock_profile(len(transformer.blocks)), backend=backend)
            state = transformer.freeloc_state
        self.state = state
        self.heads = transformer.blocks[0].attn1.heads
        u = ulysses_degree(self.heads, dims.sp_degree)
        # Dense layers: Ulysses if the heads divide, else Ulysses x ring, else ring.
        self.dense_strategy = "ulysses" if u == dims.sp_degree else ("hybrid" if u > 1 else "ring")
        if dims.sp_degree > 1:
            if strategy == "ulysses" and u != dims.sp_degree:
                raise ValueError(f"ulysses needs heads ({self.heads}) divisible by sp degree ({dims.sp_degree})")
            if u < dims.sp_degree and (strategy == "hybrid" or (strategy == "auto" and u > 1)):
                dims.sub_sp_group(u)  # every rank creates the sub-groups now, not in a forward
            state.attention = self._attention
            state.route_stock = True  # stock layers must see the whole sequence too
            transformer.rope.register_forward_hook(self._rope_rows)
            transformer.register_forward_pre_hook(self._global_grid, with_kwargs=True)

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def shards(self) -> FrameShards:
        return frame_shards(self.num_frames, self.dims.sp_degree)

    @functools.lru_cache(maxsize=16)
    def _rope_tables(self, num_frames, height, width, device):
        # The rope module reads only its input's shape; forward() directly skips our own hook.
        return self.transformer.rope.forward(_Shape((1, 1, num_frames, height, width)))

    def _rope_rows(self, module, args, output):
        latents = args[0]
        _, _, _, height, width = latents.shape
        cos, sin = self._rope_tables(self.num_frames, height, width, str(latents.device))
        self._rotary_global = (cos, sin)
        s, e = self.shards.ranges[self.dims.sp_rank]
        n = cos.shape[1] // self.num_frames
        return cos[:, s * n : e * n], sin[:, s * n : e * n]

    def _global_grid(self, module, args, kwargs):
        latents = args[0] if args else kwargs["hidden_states"]
        _, h, w = grid_of(module, latents)
        self.state.grid = (self.num_frames, h, w)

    # -- attention ------------------------------------------------------------------------------
    def _attention(self, q, k, v, rotary_local, plan: LayerPlan, t_rope):
        ctx = SPContext(
            plan=plan,
            shards=self.shards,
            sp_rank=self.dims.sp_rank,
            rotary_global=self._rotary_global,
            t_rope=t_rope,
            comm=self.comm,
            backend=self.backend,
            tag=plan.kind,
        )
        return STRATEGIES[self.strategy_for(plan, q.shape[-1])](q, k, v, ctx)

    @functools.lru_cache(maxsize=64)
    def strategy_for(self, plan: LayerPlan, head_dim: int) -> str:
        """Cheapest strategy by bytes received (worst rank), among those that apply."""
        if self.strategy != "auto":
            return self.strategy
        candidates = [self.dense_strategy]
        if plan.kind == "tsa":
            candidates.append("neighbour")
        cost = {c: max(received_elements(c, plan, self.shards, self.heads, head_dim)) for c in candidates}
        return min(candidates, key=lambda c: (cost[c], c != "neighbour"))

    # -- the sampler's contract -----------------------------------------------------------------
    def predict(self, transformer, latents, t, cond, uncond, guidance):
        """Global latents [B, C, F, H, W] -> global guided prediction (float32)."""
        dims = self.dims
        self.num_frames = latents.shape[2]
        s, e = self.shards.ranges[dims.sp_rank]
        x = latents[:, :, s:e].to(transformer.dtype)
        timestep = t.reshape(1).expand(x.shape[0]).to(x.device)
        use_cfg = uncond is not None and guidance > 1.0

        def run(text):
            return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

        if dims.cfg_degree == 2 and use_cfg:
            mine = run(cond if dims.cfg_rank == 0 else uncond).float()
            pos, neg = self.comm.cfg_all_gather(mine)
            local = neg + guidance * (pos - neg)
        elif use_cfg:
            pos, neg = run(cond).float(), run(uncond).float()
            local = neg + guidance * (pos - neg)
        else:
            local = run(cond).float()
        return self.comm.gather_frames(local, self.shards.sizes, dim=2, tag="gather")


class _Shape:
    """Stand-in for a tensor of which only `.shape` is read (WanRotaryPosEmbed.forward)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def parallelize(transformer, dims: ParallelDims, *, backend: str = "sdpa", strategy: str = "auto"):
    """Install sequence/CFG parallelism; returns the engine whose `predict` the sampler should use."""
    get_backend(backend)
    return SequenceParallel(transformer, dims, backend=backend, strategy=strategy)
