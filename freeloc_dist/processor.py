"""The attention processor FreeLOC installs on each attention layer its model's family names.

It computes q, k, v exactly as the family's stock processor does (the family adapter's project_qkv), then
hands them with the layer's kind and the token grid to an attention function; when the plan is stock (kind
full, or F <= T) it defers to the stock processor so the output is diffusers' own. It holds no rank logic: sequence
parallelism, when installed, replaces `state.attention` with a distributed function of the same
signature.

torch.compile: the FreeLOC attention is one custom op (`freeloc::attention`), opaque to dynamo, so
`torch.compile(transformer)` and `compile_repeated_blocks(fullgraph=True)` trace everything around
it (projections, norms, the stock layers) and call our kernels (and collectives) eagerly. Its
non-tensor inputs are the state's registry key, the layer kind and the grid; the op looks the state
up and builds the (cached) plan at run time. Its backward (register_autograd) is a second opaque op,
`freeloc::attention_backward`, which recomputes the layer frame by frame (freeloc_dist.attention.backward).
"""

from __future__ import annotations

import inspect
import itertools
import weakref

import torch

from .plan import LayerPlan, layer_plan

PARALLEL_HINT = "use freeloc_dist.parallelize_pipeline(pipe) for sequence parallelism with FreeLOC"

_STATES: "weakref.WeakValueDictionary[int, FreeLOCState]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()


class FreeLOCState:
    """Shared by all processors of one transformer: profile, grid of the current forward, attention fn."""

    def __init__(self, family, profile, t_rope, attention):
        self.family = family  # freeloc_dist.families.Family of the transformer
        self.profile = profile
        self.t_rope = t_rope
        self.attention = attention  # (q, k, v, rotary_emb, plan, t_rope) -> out, all [B, L, h, d]
        self.grid: tuple[int, int, int] | None = None
        self.route_stock = False  # True under sequence parallelism: stock layers need all frames too
        # joint text-video families (DESIGN 11): (qv, kv, vv, qt, kt, vt, rotary_emb, plan, t_rope, *, text_phase,
        # text_valid) -> (out_video, out_text), freeloc_dist.attention.joint; None for families without
        self.joint_attention = None
        self.engine = None  # the SequenceParallel engine driving this state, if any
        self._register()

    def _register(self):
        self.key = next(_KEYS)
        _STATES[self.key] = self

    def __deepcopy__(self, memo):
        """A copied model gets its own state (own registry key; the attention fn is shared, it is pure)."""
        if self.engine is not None:
            raise RuntimeError("copy.deepcopy of a transformer under parallelize_pipeline is not supported")
        import copy

        new = object.__new__(FreeLOCState)
        memo[id(self)] = new
        for name, value in vars(self).items():
            setattr(new, name, copy.deepcopy(value, memo))
        new._register()
        return new

    def plan_for(self, kind: str, grid) -> LayerPlan:
        """`kind` is a layer spec (Profile.layer_spec): "vrpr", or "vrpr+long" for a long-range layer."""
        p = self.profile
        base, _, long = kind.partition("+")
        long_range = p.long_range.params if long and p.long_range is not None else None
        return layer_plan(base, grid, p.trained_frames, p.vrpr, p.tsa, long_range)

    def plan(self, kind: str) -> LayerPlan:
        if self.grid is None:
            raise RuntimeError("FreeLOC: token grid unknown; call the transformer, not a block, directly")
        return self.plan_for(kind, self.grid)

    def is_stock(self, kind: str, grid) -> bool:
        """The plan's is_stock without building it (plain Python on the grid: traceable by dynamo)."""
        # F first: at F <= T the kind is never read, so dynamo compiles one graph for every block
        return grid[0] <= self.profile.trained_frames or kind == "full"  # "full+long" is not stock


@torch.library.custom_op("freeloc::attention", mutates_args=())
def freeloc_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      state_key: int, kind: str, grid: list[int]) -> torch.Tensor:
    """FreeLOC attention [B, L, h, d] of un-rotated q, k, v for one layer (see FreeLOCState.attention)."""
    state = _STATES[state_key]
    plan = state.plan_for(kind, tuple(grid))
    out = state.attention(q, k, v, (cos, sin), plan, state.t_rope)
    return out.to(q.dtype).contiguous()


@freeloc_attention.register_fake
def _(q, k, v, cos, sin, state_key, kind, grid):
    return q.new_empty(q.shape)


@torch.library.custom_op("freeloc::attention_backward", mutates_args=())
def freeloc_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cos: torch.Tensor, sin: torch.Tensor, state_key: int, kind: str,
                               grid: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of freeloc::attention, by recompute (freeloc_dist.attention.backward); opaque to dynamo too."""
    from .attention.backward import attention_vjp

    state = _STATES.get(state_key)
    if state is None:
        raise RuntimeError("FreeLOC backward: the transformer's FreeLOC state is gone (model freed or reinstalled)")
    if state.engine is not None:
        raise RuntimeError("FreeLOC backward under parallelize_pipeline (sequence parallelism) is not supported: "
                           "train without the parallel engine (gradients across ranks are not implemented)")
    plan = state.plan_for(kind, tuple(grid))
    dq, dk, dv = attention_vjp(grad, q, k, v, (cos, sin), plan, state.t_rope)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@freeloc_attention_backward.register_fake
def _(grad, q, k, v, cos, sin, state_key, kind, grid):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, state_key, kind, grid = inputs
    ctx.save_for_backward(q, k, v, cos, sin)
    ctx.plan_args = (state_key, kind, list(grid))


def _backward(ctx, grad):
    if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
        raise RuntimeError("FreeLOC backward: gradients w.r.t. the rotary tables (cos, sin) are not supported")
    q, k, v, cos, sin = ctx.saved_tensors
    dq, dk, dv = freeloc_attention_backward(grad, q, k, v, cos, sin, *ctx.plan_args)
    return dq, dk, dv, None, None, None, None, None


freeloc_attention.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("freeloc::joint_attention", mutates_args=())
def freeloc_joint_attention(qv: torch.Tensor, kv: torch.Tensor, vv: torch.Tensor, qt: torch.Tensor,
                            kt: torch.Tensor, vt: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            text_valid: torch.Tensor | None, state_key: int, kind: str,
                            grid: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """FreeLOC joint text-video attention (video [B, Lv, h, d], text [B, Lt, h, d]) of one layer (DESIGN 11)."""
    state = _STATES[state_key]
    plan = state.plan_for(kind, tuple(grid))
    out_v, out_t = state.joint_attention(qv, kv, vv, qt, kt, vt, (cos, sin), plan, state.t_rope,
                                         text_phase=state.profile.joint_text_phase, text_valid=text_valid)
    return out_v.to(qv.dtype).contiguous(), out_t.to(qt.dtype).contiguous()


@freeloc_joint_attention.register_fake
def _(qv, kv, vv, qt, kt, vt, cos, sin, text_valid, state_key, kind, grid):
    return qv.new_empty(qv.shape), qt.new_empty(qt.shape)


def _with_signature_of(fn, model):
    """`fn`, presenting the call signature of `model` to inspect.signature."""

    def call(*args, **kwargs):
        return fn(*args, **kwargs)

    call.__signature__ = inspect.signature(model)
    return call


class FreeLOCAttnProcessor:
    def __init__(self, kind: str, state: FreeLOCState):
        self.kind = kind
        self.state = state
        self.stock = state.family.stock_processor()
        # diffusers' generic Attention module (HunyuanVideo's) hands a processor only the keyword arguments its
        # __call__ names (inspect.signature(processor.__call__): image_rotary_emb would be dropped silently): the
        # instance shows the stock processor's signature there, and calls still run the class's __call__. Only
        # there: dynamo cannot trace an instance attribute __call__ (torch.compile of Wan's blocks broke on it).
        if state.family.joint_text:
            self.__call__ = _with_signature_of(self._call, self.stock.__call__)

    # diffusers' set_attention_backend is honoured where diffusers' attention runs (stock plans);
    # its context parallelism is refused (install.py), so _parallel_config stays None.
    @property
    def _attention_backend(self):
        return self.stock._attention_backend

    @_attention_backend.setter
    def _attention_backend(self, backend):
        self.stock._attention_backend = backend

    @property
    def _parallel_config(self):
        return None

    @_parallel_config.setter
    def _parallel_config(self, config):
        if config is not None:
            raise RuntimeError(f"diffusers' parallel_config cannot be set on FreeLOC processors; {PARALLEL_HINT}")

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return self._call(attn, hidden_states, *args, **kwargs)

    def _call(self, attn, hidden_states, *args, **kwargs):
        state = self.state
        family = state.family
        rotary_emb = family.freeloc_rotary(args, kwargs)
        if rotary_emb is None:  # a call FreeLOC leaves alone (the family says which)
            return self.stock(attn, hidden_states, *args, **kwargs)
        grid = state.grid
        if grid is None:
            raise RuntimeError("FreeLOC: token grid unknown; call the transformer, not a block, directly")
        if state.is_stock(self.kind, grid) and not state.route_stock:
            return self.stock(attn, hidden_states, *args, **kwargs)
        q, k, v = family.project_qkv(attn, hidden_states)
        cos, sin = rotary_emb
        if family.joint_text:  # text joins this attention: never left to the stock path at F > T (DESIGN 11)
            text, text_valid = family.joint_inputs(args, kwargs, hidden_states.shape[1])
            qt, kt, vt = family.project_text_qkv(attn, text)
            out_v, out_t = freeloc_joint_attention(q, k, v, qt, kt, vt, cos, sin, text_valid, state.key, self.kind,
                                                   list(grid))
            return family.project_joint_out(attn, out_v, out_t, q.dtype)
        out = freeloc_attention(q, k, v, cos, sin, state.key, self.kind, list(grid))
        return family.project_out(attn, out, q.dtype)
