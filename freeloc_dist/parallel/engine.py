"""parallelize(): install sequence and CFG parallelism on a built Wan transformer.

The model code stays stock. Three hooks carry everything: the FreeLOC processors' attention function
(replaced by a distributed one), a forward hook on `transformer.rope` (each rank gets the rows of the
whole video's RoPE table for its own frames) and a pre-hook that records the global token grid. The
engine's `predict` has the sampler's contract: global latents in, global guided prediction out; in
between, each rank runs the transformer on its frames only.
"""

from __future__ import annotations

import torch

from ..attention import get_backend
from ..guidance import combine, uses_cfg
from ..install import apply_freeloc
from ..plan import LayerPlan
from ..processor import grid_of
from .comm import Comm
from .decisions import check_strategy, layer_strategy, ulysses_degree
from .dims import ParallelDims
from .shards import FrameShards, frame_shards
from .strategies import STRATEGIES, SPContext


def stock_profile(num_layers: int) -> dict:
    """Every layer full at any length: the engine's path for renders without FreeLOC."""
    return {
        "model": "stock",
        "trained_frames": 1 << 30,
        "source": "stock attention (no FreeLOC profile)",
        "layers": {"full": list(range(num_layers))},
    }


class SequenceParallel:
    def __init__(self, transformer, dims: ParallelDims, *, backend: str = "sdpa", strategy: str = "auto",
                 comm: Comm | None = None):
        self.transformer = transformer
        self.dims = dims
        self.comm = comm if comm is not None else Comm(dims)
        self.backend = backend
        self.strategy = strategy
        self.num_frames: int | None = None  # global latent frames of the current render
        self._rope_cache: dict[tuple, tuple] = {}
        state = getattr(transformer, "freeloc_state", None)
        if state is None:
            apply_freeloc(transformer, stock_profile(len(transformer.blocks)), backend=backend)
            state = transformer.freeloc_state
        self.state = state
        self.heads = transformer.blocks[0].attn1.heads
        check_strategy(strategy, self.heads, dims.sp_degree)
        if dims.sp_degree > 1:
            u = ulysses_degree(self.heads, dims.sp_degree)
            if 1 < u < dims.sp_degree and strategy in ("hybrid", "auto"):
                dims.sub_sp_group(u)  # every rank creates the sub-groups now, not in a forward
            state.attention = self._attention
            state.route_stock = True  # stock layers must see the whole sequence too
            transformer.rope.register_forward_hook(self._rope_rows)
            transformer.register_forward_pre_hook(self._global_grid, with_kwargs=True)

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def shards(self) -> FrameShards:
        return frame_shards(self.num_frames, self.dims.sp_degree)

    def _rope_tables(self, num_frames, height, width, device):
        """Wan's RoPE (cos, sin) of the whole video, built once per shape (kept on the engine, not a global cache)."""
        key = (num_frames, height, width, device)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 4:  # a queue of many lengths: keep the newest few (each is L x d floats)
                self._rope_cache.pop(next(iter(self._rope_cache)))
            # The rope module reads only its input's shape; forward() directly skips our own hook.
            self._rope_cache[key] = self.transformer.rope.forward(_Shape((1, 1, num_frames, height, width)))
        return self._rope_cache[key]

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

    def strategy_for(self, plan: LayerPlan, head_dim: int) -> str:
        """The strategy this layer runs (decisions.layer_strategy, the planner's rule too)."""
        return layer_strategy(plan, self.shards, self.heads, head_dim, self.strategy)

    # -- the sampler's contract -----------------------------------------------------------------
    def predict(self, transformer, latents, t, cond, uncond, guidance):
        """Global latents [B, C, F, H, W] -> global guided prediction (float32)."""
        dims = self.dims
        self.num_frames = latents.shape[2]
        s, e = self.shards.ranges[dims.sp_rank]
        x = latents[:, :, s:e].to(transformer.dtype)
        timestep = t.reshape(1).expand(x.shape[0]).to(x.device)
        use_cfg = uses_cfg(uncond, guidance)

        def run(text):
            return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]

        if dims.cfg_degree == 2 and use_cfg:
            mine = run(cond if dims.cfg_rank == 0 else uncond).float()
            pos, neg = self.comm.cfg_all_gather(mine)
            local = combine(pos, neg, guidance)
        elif use_cfg:
            local = combine(run(cond).float(), run(uncond).float(), guidance)
        else:
            local = run(cond).float()
        return self.comm.gather_frames(local, self.shards.sizes, dim=2, tag="gather")


class _Shape:
    """Stand-in for a tensor of which only `.shape` is read (WanRotaryPosEmbed.forward)."""

    def __init__(self, shape):
        self.shape = torch.Size(shape)


def parallelize(transformer, dims: ParallelDims, *, backend: str = "sdpa", strategy: str = "auto",
                comm: Comm | None = None):
    """Install sequence/CFG parallelism; returns the engine whose `predict` the sampler should use.
    Two-expert models parallelize each transformer, passing the first engine's `comm` to the second so
    that byte counts (and the process groups of `dims`) are shared."""
    get_backend(backend)
    return SequenceParallel(transformer, dims, backend=backend, strategy=strategy, comm=comm)
