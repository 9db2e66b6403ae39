"""Gradients through FreeLOC at F > T (where its attention op runs) against float64 autograd through the oracle.

The op's backward (freeloc::attention_backward) recomputes the layer frame by frame in float32; the oracle
is torch autograd through split_rotations + reference_attention in float64, the op bypassed. Tolerance 1e-4
relative (Frobenius): float32 rounding of the recompute measured ~1e-6 (op) and ~1e-6 (whole tiny model);
a wrong offset, mask or missing term errs by > 1e-2.
"""

import copy

import pytest
import torch
from _tiny import THREE_LAYERS, rel_err, tiny_transformer, transformer_inputs

from freeloc_dist import apply_freeloc
from freeloc_dist import processor as processor_module
from freeloc_dist.attention import get_backend
from freeloc_dist.attention.reference import reference_attention
from freeloc_dist.processor import FreeLOCState, freeloc_attention
from freeloc_dist.profile import load_profile
from freeloc_dist.rope import TemporalRope, split_rotations

pytestmark = pytest.mark.unit

TOL = 1e-4
T = THREE_LAYERS["trained_frames"]  # 4
# THREE_LAYERS (tsa / vrpr / full) with long range on the vrpr and full layers: every layer kind the op serves.
PROFILE = {**THREE_LAYERS, "long_range": {"layers": [1, 2], "band_frames": 1, "stride_frames": 3, "sink_frames": [0]}}
KINDS = ("tsa", "vrpr", "vrpr+long", "full+long", "full")  # "full" at F > T: the stock plan parallel paths route here
HW = (3, 4)  # n = 12 tokens per frame: the tsa stripe (width 2) is a real band
T_ROPE = TemporalRope(t_dim=4)  # Wan's temporal channels at head_dim 12


def _op_inputs(num_frames, seed=0):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    g = torch.Generator().manual_seed(seed)
    size = num_frames * HW[0] * HW[1]
    q, k, v, grad = (torch.randn(2, size, 3, 12, generator=g) for _ in range(4))  # [B, L, h, d] as projected
    cos, sin = WanRotaryPosEmbed(12, (1, 2, 2), 64)(torch.empty(1, 4, num_frames, 2 * HW[0], 2 * HW[1]))
    return q, k, v, cos, sin, grad


def _oracle_grads(q, k, v, cos, sin, grad, plan):
    q, k, v = (x.double().requires_grad_() for x in (q, k, v))
    q0, k0 = (x.transpose(1, 2) for x in split_rotations(q, k, (cos, sin), T_ROPE)[2:])
    out = reference_attention(q0, k0, v.transpose(1, 2), plan, T_ROPE).transpose(1, 2)
    return torch.autograd.grad(out, (q, k, v), grad.double())


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("kind", KINDS)
def test_op_gradients_match_the_oracle(backend, kind):
    num_frames = 2 * T + 1
    state = FreeLOCState(None, load_profile(PROFILE), T_ROPE, get_backend(backend).run)
    q, k, v, cos, sin, grad = _op_inputs(num_frames)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = freeloc_attention(*leaves, cos, sin, state.key, kind, [num_frames, *HW])
    got = torch.autograd.grad(out, leaves, grad)
    want = _oracle_grads(q, k, v, cos, sin, grad, state.plan_for(kind, (num_frames, *HW)))
    errs = [rel_err(g, w) for g, w in zip(got, want)]
    assert all(g.dtype == torch.float32 for g in got)
    assert max(errs) < TOL, errs


def test_op_gradients_in_bfloat16():
    """bf16 inputs (the CUDA dtype): the recompute runs in float32, gradients come back in bf16."""
    num_frames = T + 1
    state = FreeLOCState(None, load_profile(PROFILE), T_ROPE, get_backend("sdpa").run)
    q, k, v, cos, sin, grad = (x.bfloat16() for x in _op_inputs(num_frames))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = torch.autograd.grad(freeloc_attention(*leaves, cos, sin, state.key, "tsa", [num_frames, *HW]), leaves, grad)
    want = _oracle_grads(q, k, v, cos.float(), sin.float(), grad, state.plan_for("tsa", (num_frames, *HW)))
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert max(rel_err(g, w) for g, w in zip(got, want)) < 2e-2


def _oracle_op(q, k, v, cos, sin, state_key, kind, grid):
    """freeloc::attention as plain differentiable torch (float64 oracle), for the whole-model reference."""
    state = processor_module._STATES[state_key]
    plan = state.plan_for(kind, tuple(grid))
    q0, k0 = (x.transpose(1, 2) for x in split_rotations(q, k, (cos, sin), state.t_rope)[2:])
    return reference_attention(q0, k0, v.transpose(1, 2), plan, state.t_rope).to(q.dtype).transpose(1, 2)


def _model_grads(model, inputs, weight):
    model.zero_grad(set_to_none=True)
    latents = inputs["hidden_states"].clone().requires_grad_()
    out = model(**{**inputs, "hidden_states": latents})[0]
    (out * weight.to(out.dtype)).sum().backward()
    return latents.grad, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_transformer_gradients_match_the_oracle(backend, monkeypatch):
    """A whole tiny Wan transformer (tsa, vrpr+long, full+long layers) at F = 9 > T = 4: gradients w.r.t. its
    input and every parameter, float32 through the op vs float64 autograd through the reference."""
    num_frames = 2 * T + 1
    model = tiny_transformer(num_layers=3)
    apply_freeloc(model, PROFILE, backend=backend)
    oracle = copy.deepcopy(model).double()
    inputs = transformer_inputs(num_frames)
    weight = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    d_input, d_params = _model_grads(model, inputs, weight)
    monkeypatch.setattr(processor_module, "freeloc_attention", _oracle_op)
    inputs64 = {**inputs, "hidden_states": inputs["hidden_states"].double(),
                "encoder_hidden_states": inputs["encoder_hidden_states"].double()}
    want_input, want_params = _model_grads(oracle, inputs64, weight)
    assert rel_err(d_input, want_input) < TOL
    got = torch.cat([d_params[n].flatten() for n in want_params if want_params[n] is not None])
    want = torch.cat([g.flatten() for g in want_params.values() if g is not None])
    assert rel_err(got, want) < TOL
    attn = [n for n in want_params if ".attn1.to_q." in n or ".attn1.to_k." in n or ".attn1.to_v." in n]
    assert len(attn) == 3 * 3 * 2  # weight and bias of q, k, v in each of the 3 layers
    for name in attn:
        assert rel_err(d_params[name], want_params[name]) < TOL, name


def test_backward_under_the_parallel_engine_is_refused_in_one_line():
    """Sequence parallelism: gradients across ranks are not implemented, so backward says so (forward runs)."""
    num_frames = T + 1
    state = FreeLOCState(None, load_profile(PROFILE), T_ROPE, get_backend("sdpa").run)
    state.engine = object()  # stands in for a SequenceParallel engine driving this state
    q, k, v, cos, sin, grad = _op_inputs(num_frames)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = freeloc_attention(*leaves, cos, sin, state.key, "vrpr", [num_frames, *HW])
    with pytest.raises(RuntimeError, match=r"backward under parallelize_pipeline .* not supported"):
        out.backward(grad)


def test_gradients_of_the_rotary_tables_are_refused():
    num_frames = T + 1
    state = FreeLOCState(None, load_profile(PROFILE), T_ROPE, get_backend("sdpa").run)
    q, k, v, cos, sin, grad = _op_inputs(num_frames)
    out = freeloc_attention(q.requires_grad_(), k, v, cos.requires_grad_(), sin, state.key, "vrpr",
                            [num_frames, *HW])
    with pytest.raises(RuntimeError, match=r"rotary tables \(cos, sin\) are not supported"):
        out.backward(grad)
