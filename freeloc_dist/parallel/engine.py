"""parallelize(): install sequence and CFG parallelism on a built transformer of a supported family.

The model code stays stock. Four hooks carry everything: the FreeLOC processors' attention function
(replaced by a distributed one), a forward hook on the family's rope module (each rank gets the rows of the
whole video's RoPE table for its own frames), a pre-hook that records the global token grid, and a
wrapper of `transformer.forward` (GlobalForward) so that a direct call, as a stock diffusers pipeline
makes it, takes global latents and returns the global prediction. The engine keeps the handles of its hooks
and `detach()` removes exactly those. The engine's `predict` has the
sampler's contract: global latents in, global guided prediction out; in between, each rank runs the
transformer on its frames only. `remove()` (or freeloc_dist.remove_freeloc) takes it all out again.
"""

from __future__ import annotations

import torch

from ..attention import get_backend
from ..families import family_of
from ..guidance import combine, runs_uncond
from ..install import apply_freeloc, remove_freeloc
from ..plan import LayerPlan
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
        self._hooks: list = []  # RemovableHandles of the hooks this engine registered
        state = getattr(transformer, "freeloc_state", None)
        if state is not None and state.engine is not None:
            raise RuntimeError("this transformer is already parallelised (parallelize / parallelize_pipeline)")
        self.owns_install = state is None
        if state is None:
            num_layers = len(family_of(transformer).attention_layers(transformer))
            apply_freeloc(transformer, stock_profile(num_layers), backend=backend)
            state = transformer.freeloc_state
        self.state = state
        self.family = state.family
        state.engine = self
        self._saved_attention = state.attention
        self._local = False  # True inside predict: the transformer is then called with this rank's frames
        self.forward = GlobalForward(self, transformer.forward)
        transformer.forward = self.forward
        self.heads = self.family.num_heads(transformer)
        check_strategy(strategy, self.heads, dims.sp_degree, degenerate_hybrid=True)
        if dims.sp_degree > 1:
            u = ulysses_degree(self.heads, dims.sp_degree)
            if 1 < u < dims.sp_degree and strategy in ("hybrid", "auto"):
                dims.sub_sp_group(u)  # every rank creates the sub-groups now, not in a forward
            state.attention = self._attention
            state.route_stock = True  # stock layers must see the whole sequence too
            self._hooks = [
                self.family.rope_module(transformer).register_forward_hook(self._rope_rows),
                transformer.register_forward_pre_hook(self._global_grid, with_kwargs=True),
            ]

    def remove(self) -> None:
        """Undo parallelize: the engine's hooks go; FreeLOC stays if it was installed before."""
        if self.state.engine is not self:
            return
        if self.owns_install:
            remove_freeloc(self.transformer)  # which detaches this engine first
            return
        self.detach()
        self.state.attention = self._saved_attention
        self.state.route_stock = False
        self.state.engine = None

    def detach(self) -> None:
        """Remove this engine's hooks and its forward wrapper (remove_freeloc calls it before the processors go)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.transformer.__dict__.get("forward") is self.forward:
            del self.transformer.__dict__["forward"]

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def shards(self) -> FrameShards:
        return frame_shards(self.num_frames, self.dims.sp_degree)

    def _rope_tables(self, num_frames, height, width, device):
        """The RoPE (cos, sin) of the whole video, built once per shape (kept on the engine, not a global cache)."""
        key = (num_frames, height, width, device)
        if key not in self._rope_cache:
            if len(self._rope_cache) >= 4:  # a queue of many lengths: keep the newest few (each is L x d floats)
                self._rope_cache.pop(next(iter(self._rope_cache)))
            self._rope_cache[key] = self.family.global_rope(self.transformer, num_frames, height, width)
        return self._rope_cache[key]

    @torch.compiler.disable
    def _rope_rows(self, module, args, output):
        latents = args[0]
        _, _, _, height, width = latents.shape
        cos, sin = self._rope_tables(self.num_frames, height, width, str(latents.device))
        self._rotary_global = (cos, sin)
        s, e = self.shards.ranges[self.dims.sp_rank]
        n = cos.shape[1] // self.num_frames
        return cos[:, s * n : e * n], sin[:, s * n : e * n]

    @torch.compiler.disable
    def _global_grid(self, module, args, kwargs):
        latents = args[0] if args else kwargs["hidden_states"]
        if not self._local:  # a direct call: the input is the whole video (GlobalForward shards it next)
            self.num_frames = latents.shape[2]
        _, h, w = self.family.grid_of(module, latents)
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
            tag=plan.label,  # "vrpr+long" for long-range layers: their bytes are counted apart
        )
        return STRATEGIES[self.strategy_for(plan, q.shape[-1])](q, k, v, ctx)

    def strategy_for(self, plan: LayerPlan, head_dim: int) -> str:
        """The strategy this layer runs (decisions.layer_strategy, the planner's rule too)."""
        return layer_strategy(plan, self.shards, self.heads, head_dim, self.strategy)

    # -- the sampler's contract -----------------------------------------------------------------
    def predict(self, transformer, latents, t, cond, uncond, guidance, *, condition=None):
        """Global latents [B, C, F, H, W] -> global guided prediction (float32). `t`: the step's timestep, or
        per-token timesteps [B, F n] of the whole video (Wan2.2 TI2V), sliced here like the latents.
        `condition` (image-to-video, freeloc_dist.families.wan.conditioning.Conditioning) holds the whole video's
        conditioning: this rank's frames of it join its latents, and its image tokens (not sharded) go to
        every pass of every rank."""
        dims = self.dims
        self.num_frames = latents.shape[2]
        s, e = self.shards.ranges[dims.sp_rank]
        x = latents[:, :, s:e].to(transformer.dtype)
        extra = {}
        if condition is not None:
            x, extra = condition.input_for(x, s, e), condition.transformer_kwargs()
        timestep = self._local_timestep(t).to(x.device)  # [B], or this rank's tokens [B, (e - s) n]
        if timestep.ndim < 2:
            timestep = timestep.reshape(1).expand(x.shape[0])
        use_cfg = runs_uncond(uncond)  # the render decided (its first scale > 1), not this step's scale

        def run(text):
            self._local = True
            try:
                return transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=text,
                                   return_dict=False, **extra)[0]
            finally:
                self._local = False

        if dims.cfg_degree == 2 and use_cfg:
            mine = run(cond if dims.cfg_rank == 0 else uncond).float()
            pos, neg = self.comm.cfg_all_gather(mine)
            local = combine(pos, neg, guidance)
        elif use_cfg:
            local = combine(run(cond).float(), run(uncond).float(), guidance)
        else:
            local = run(cond).float()
        return self.comm.gather_frames(local, self.shards.sizes, dim=2, tag="gather")


    # -- a direct call of the transformer (a stock pipeline's) ----------------------------------
    @torch.compiler.disable
    def shard_input(self, hidden_states, timestep):
        """Global latents [B, C, F, H, W] -> this rank's frames (and per-token timesteps, Wan 2.2 TI2V)."""
        self.num_frames = hidden_states.shape[2]
        s, e = self.shards.ranges[self.dims.sp_rank]
        return hidden_states[:, :, s:e], self._local_timestep(timestep)

    def _local_timestep(self, timestep):
        """Per-token timesteps [B, F n] (frame-major) -> this rank's tokens [B, (e - s) n], the same frames as its
        latents; a scalar or per-sample timestep passes through."""
        if timestep is None or timestep.ndim != 2:
            return timestep
        s, e = self.shards.ranges[self.dims.sp_rank]
        n, rest = divmod(timestep.shape[1], self.num_frames)
        assert rest == 0, (tuple(timestep.shape), self.num_frames)
        return timestep[:, s * n : e * n]

    @torch.compiler.disable
    def check_same_inputs(self, *tensors):
        """Every rank must call with the same inputs (a stock pipeline draws its noise on each rank):
        one tiny collective per call instead of a silently inconsistent video."""
        sums = [t.double().sum() if isinstance(t, torch.Tensor) else torch.zeros((), dtype=torch.float64)
                for t in tensors]
        if not self.comm.same_on_every_rank(torch.stack(sums).to(self.dims.device)):
            raise RuntimeError(
                "parallelize_pipeline: ranks called the transformer with different inputs; give every rank the same "
                "prompt and arguments and a generator seeded alike, e.g. generator=torch.Generator().manual_seed(0)"
            )

    @torch.compiler.disable
    def gather_output(self, local):
        return self.comm.gather_frames(local.contiguous(), self.shards.sizes, dim=2, tag="gather")


class GlobalForward:
    """transformer.forward under the engine: global latents in, global prediction out, each rank running
    its own frames through the stock forward (`inner`). Inside `predict` (already sharded) it passes
    through. `pairing`, when set (parallelize_pipeline with cfg_degree 2), pairs a pipeline's cond and
    uncond calls over the two CFG groups."""

    def __init__(self, engine: SequenceParallel, inner):
        self.engine = engine
        self.inner = inner
        self.pairing = None

    # Skipped by dynamo, not its callees: under torch.compile(transformer) the stock forward is still
    # compiled, while the sharding, gathering and checks here run eagerly.
    @torch.compiler.disable(recursive=False)
    def __call__(self, hidden_states=None, timestep=None, encoder_hidden_states=None, *args, **kwargs):
        if self.engine._local:
            return self.inner(hidden_states, timestep, encoder_hidden_states, *args, **kwargs)
        self.engine.check_same_inputs(hidden_states, timestep, encoder_hidden_states)
        if self.pairing is not None:
            return self.pairing(self, hidden_states, timestep, encoder_hidden_states, *args, **kwargs)
        return self.run_global(hidden_states, timestep, encoder_hidden_states, *args, **kwargs)

    def run_global(self, hidden_states, timestep, encoder_hidden_states, *args, return_dict=True, **kwargs):
        engine = self.engine
        x, timestep = engine.shard_input(hidden_states, timestep)
        out = self.inner(x, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        out = engine.gather_output(out)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


def parallelize(transformer, dims: ParallelDims, *, backend: str = "sdpa", strategy: str = "auto",
                comm: Comm | None = None):
    """Install sequence/CFG parallelism; returns the engine whose `predict` the sampler should use.
    Two-expert models parallelize each transformer, passing the first engine's `comm` to the second so
    that byte counts (and the process groups of `dims`) are shared."""
    get_backend(backend)
    return SequenceParallel(transformer, dims, backend=backend, strategy=strategy, comm=comm)
