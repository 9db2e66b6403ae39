"""parallelize(): install sequence and CFG parallelism on a built transformer of a supported family.

The model code stays stock. Module hooks carry everything: the FreeLOC processors' attention function
(replaced by a distributed one), a forward hook on the family's rope module (each rank gets the rows of the
whole video's RoPE table for its own frames), and a forward pre-hook / forward hook pair on the transformer
that make a direct call, as a stock diffusers pipeline makes it, take global latents and return the global
prediction (the pre-hook records the global grid and shards the input, the forward hook gathers the output).
These live in the module's hook dicts, not in `transformer.forward`, so they survive the hook systems that
wrap and later restore `forward` (accelerate's offload hooks, diffusers' HookRegistry), in either order.
A pass-through wrapper of `transformer.forward` (GlobalForward) only lets a paired CFG call skip its forward,
and serves a direct `transformer.forward(...)` call; it is put back when another system unwrapped it.
The engine keeps the handles of its hooks and `detach()` removes exactly those. The engine's `predict` has the
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
from .caches import make_global, release
from .call_args import POSITIONAL, call_input, with_input
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
        self._call: GlobalCall | None = None  # the global call under way (set by _enter, cleared by _leave)
        self._predict_input = None  # inside predict: makes the whole video's transformer input (for caches.py)
        self.pairing = None  # parallelize_pipeline with cfg_degree 2: pipeline.CFGPairing
        self._wrappers: list[GlobalForward] = []
        self.forward = self._wrap_forward()
        self.heads = self.family.num_heads(transformer)
        check_strategy(strategy, self.heads, dims.sp_degree, degenerate_hybrid=True)
        if dims.sp_degree > 1:
            u = ulysses_degree(self.heads, dims.sp_degree)
            if 1 < u < dims.sp_degree and strategy in ("hybrid", "auto"):
                dims.sub_sp_group(u)  # every rank creates the sub-groups now, not in a forward
            state.attention = self._attention
            if self.family.joint_text:  # text joins the video's attention: replicated text (parallel/joint.py)
                self._saved_joint = state.joint_attention
                state.joint_attention = self._joint_attention
            state.route_stock = True  # stock layers must see the whole sequence too
            self._hooks = [
                self.family.rope_module(transformer).register_forward_hook(self._rope_rows),
            ]
        self._hooks += [
            transformer.register_forward_pre_hook(self._enter, with_kwargs=True),
            # the first of the forward hooks (later ones see the global output), also called when the forward raised
            transformer.register_forward_hook(self._leave, with_kwargs=True, prepend=True, always_call=True),
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
        if hasattr(self, "_saved_joint"):
            self.state.joint_attention = self._saved_joint
        self.state.route_stock = False
        self.state.engine = None

    def detach(self) -> None:
        """Remove this engine's hooks and its forward wrappers (remove_freeloc calls it before the processors go).
        A wrapper that another hook system holds on to (accelerate's `_old_forward`, a HookRegistry chain) is
        left there as a pure pass-through; the outermost one is unwrapped."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        release(self.transformer)
        self._call = None
        for wrapper in self._wrappers:
            wrapper.engine = None
        self._wrappers = []
        outer = self.transformer.__dict__.get("forward")
        if isinstance(outer, GlobalForward) and outer.engine is None:
            inner = outer.inner
            if getattr(inner, "__self__", None) is self.transformer and getattr(inner, "__func__", None) is getattr(
                    type(self.transformer).forward, "__func__", type(self.transformer).forward):
                del self.transformer.__dict__["forward"]  # the class's own forward again
            else:
                self.transformer.forward = inner  # another system's wrapper stays in place

    def _wrap_forward(self) -> GlobalForward:
        wrapper = GlobalForward(self, self.transformer.forward)
        self.transformer.forward = wrapper
        self._wrappers.append(wrapper)
        return wrapper

    def _wrapped(self) -> bool:
        """Whether one of this engine's GlobalForward wrappers is on the current forward chain (followed through
        GlobalForward.inner and functools' __wrapped__, which accelerate's and diffusers' wrappers set)."""
        fn = self.transformer.forward
        for _ in range(64):
            if isinstance(fn, GlobalForward) and fn.engine is self:
                return True
            fn = fn.inner if isinstance(fn, GlobalForward) else getattr(fn, "__wrapped__", None)
            if fn is None:
                return False
        return False

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
    def _enter(self, module, args, kwargs):
        """Forward pre-hook of the transformer. Inside `predict` (this rank's frames already): record the global
        grid. A direct call (a stock pipeline's): the input is the whole video; check that every rank has the same,
        pair it for CFG, record the grid and give the forward this rank's frames (`_leave` gathers)."""
        self._call = None
        latents = _arg(args, kwargs, 0)
        if self._local or not _is_video(latents):
            if _is_video(latents):
                _, h, w = self.family.grid_of(module, latents)
                self.state.grid = (self.num_frames, h, w)
            return None
        call = self.begin_call(args, kwargs)
        args, kwargs = call.args, call.kwargs
        if not self._wrapped():
            self._wrap_forward()  # unwrapped by another hook system: the next calls can skip a paired call again
        self._call = call
        return args, kwargs

    def begin_call(self, args, kwargs) -> GlobalCall:
        """A global call (global latents, timestep, text): checked, paired, sharded."""
        hidden, timestep, text = (_arg(args, kwargs, i) for i in range(3))
        self.check_same_inputs(hidden, timestep, text)
        make_global(self.transformer, self)  # caches installed before or after parallelize decide together
        self.num_frames = hidden.shape[2]
        _, h, w = self.family.grid_of(self.transformer, hidden)
        self.state.grid = (self.num_frames, h, w)
        call = GlobalCall(hidden, timestep, text)
        if self.pairing is not None:
            call.mode, call.value = self.pairing.decide(args, kwargs)
            if call.mode == "pair" and self.dims.cfg_rank == 1:  # this group computes the uncond pass
                args, kwargs = self.pairing.uncond_inputs(args, kwargs, call.value)
                text = _arg(args, kwargs, 2)
        x, local_t = self.shard_input(hidden, timestep)
        call.args, call.kwargs = _with_args(args, kwargs, x, local_t, text)
        return call

    def finish_call(self, call: GlobalCall, output):
        """The forward's output (this rank's frames) -> the global prediction, in the output's own form."""
        if call.mode == "cached":
            out = call.value
        else:
            out = self.gather_output(_sample(output))
            if call.mode == "pair":
                out, uncond = self.comm.cfg_all_gather(out)
                self.pairing.remember(call.hidden, call.timestep, call.value, uncond)
        return _with_sample(output, out)

    @torch.compiler.disable
    def _leave(self, module, args, kwargs, output):
        """Forward hook of the transformer (also called when the forward raised, then with output None)."""
        call, self._call = self._call, None
        if call is None or output is None or call.done:  # a local call, an error, or GlobalForward answered
            return None
        return self.finish_call(call, output)

    def global_input(self):
        """The whole video's transformer input [B, C, F, H, W] of the call under way (None outside one)."""
        if self._call is not None:
            return self._call.hidden
        return None if self._predict_input is None else self._predict_input()

    # -- attention ------------------------------------------------------------------------------
    def _joint_attention(self, qv, kv, vv, qt, kt, vt, rotary_local, plan: LayerPlan, t_rope, *, text_phase,
                         text_valid):
        from .joint import joint_attention_sp

        return joint_attention_sp(qv, kv, vv, qt, kt, vt, self._context(plan, t_rope),
                                  self.strategy_for(plan, qv.shape[-1]), text_phase=text_phase, text_valid=text_valid)

    def _context(self, plan: LayerPlan, t_rope) -> SPContext:
        return SPContext(
            plan=plan,
            shards=self.shards,
            sp_rank=self.dims.sp_rank,
            rotary_global=self._rotary_global,
            t_rope=t_rope,
            comm=self.comm,
            backend=self.backend,
            tag=plan.label,  # "vrpr+long" for long-range layers: their bytes are counted apart
        )

    def _attention(self, q, k, v, rotary_local, plan: LayerPlan, t_rope):
        return STRATEGIES[self.strategy_for(plan, q.shape[-1])](q, k, v, self._context(plan, t_rope))

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

        make_global(transformer, self)

        def whole():  # only a cache that reads the input builds it (the whole video's, on every rank)
            x = latents.to(transformer.dtype)
            return x if condition is None else condition.input_for(x)

        def run(text):
            self._local, self._predict_input = True, whole
            try:
                return transformer(hidden_states=x, timestep=timestep, return_dict=False,
                                   **self.family.text_kwargs(text), **extra)[0]
            finally:
                self._local, self._predict_input = False, None

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


class GlobalCall:
    """One global call of the transformer: its global inputs, the sharded args the forward runs with, and how
    CFG pairing treats it: "plain", "pair" (`value`: the negative text inputs this call's uncond half uses) or
    "cached" (`value`: the global uncond prediction already computed at the paired cond call)."""

    def __init__(self, hidden, timestep, text):
        self.hidden, self.timestep, self.text = hidden, timestep, text
        self.mode = "plain"
        self.value = None
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.done = False  # GlobalForward answered it (a cached call): nothing left for _leave


def _arg(args, kwargs, i):
    return call_input(args, kwargs, POSITIONAL[i])


def _with_args(args, kwargs, *values):
    for name, value in zip(POSITIONAL, values):
        args, kwargs = with_input(args, kwargs, name, value)
    return args, kwargs


def _is_video(latents) -> bool:
    return isinstance(latents, torch.Tensor) and latents.ndim == 5


def _sample(output):
    return output[0] if isinstance(output, tuple) else output.sample


def _with_sample(output, sample):
    if isinstance(output, tuple):
        return (sample, *output[1:])
    return _as_output(sample, True)


def _as_output(sample, return_dict):
    if not return_dict:
        return (sample,)
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample)


class GlobalForward:
    """A pass-through wrapper of transformer.forward. Under a module call the engine's hooks shard and gather
    (SequenceParallel._enter / _leave); this wrapper only answers a CFG-paired uncond call from the cached
    prediction without running the forward. A direct `transformer.forward(...)` call (no module hooks ran)
    gets the whole global path here. With `engine` None (detached) it only passes through."""

    def __init__(self, engine: SequenceParallel, inner):
        self.engine = engine
        self.inner = inner

    @property
    def pairing(self):  # kept for callers of engine.forward.pairing
        return None if self.engine is None else self.engine.pairing

    @pairing.setter
    def pairing(self, value):
        self.engine.pairing = value

    # Skipped by dynamo, not its callees: under torch.compile(transformer) the stock forward is still
    # compiled, while the sharding, gathering and checks here run eagerly.
    @torch.compiler.disable(recursive=False)
    def __call__(self, *args, **kwargs):
        engine = self.engine
        if engine is None or engine._local or not _is_video(_arg(args, kwargs, 0)):
            return self.inner(*args, **kwargs)
        call = engine._call
        if call is not None:  # under the hooks: the input is this rank's already
            if call.mode == "cached" and not call.done:
                call.done = True
                return _as_output(call.value, kwargs.get("return_dict", True))
            return self.inner(*args, **kwargs)
        call = engine.begin_call(args, kwargs)  # a direct transformer.forward(...) call
        if call.mode == "cached":
            return _as_output(call.value, kwargs.get("return_dict", True))
        engine._call, call.done = call, True  # seen by the caches (global_input); nothing left for _leave
        try:
            output = self.inner(*call.args, **call.kwargs)
        finally:
            engine._call = None
        return engine.finish_call(call, output)


def parallelize(transformer, dims: ParallelDims, *, backend: str = "sdpa", strategy: str = "auto",
                comm: Comm | None = None):
    """Install sequence/CFG parallelism; returns the engine whose `predict` the sampler should use.
    Two-expert models parallelize each transformer, passing the first engine's `comm` to the second so
    that byte counts (and the process groups of `dims`) are shared."""
    get_backend(backend)
    return SequenceParallel(transformer, dims, backend=backend, strategy=strategy, comm=comm)
