"""FreeLOC as a diffusers citizen (issue 12), one process: removable, cast-safe, deep-copyable, one token per
frame, refusing diffusers' parallelism, honouring set_attention_backend, on a stock WanPipeline.

Tolerances: 1e-5 relative against the float64 reference backend (as test_install.py); "bitwise" where the
same stock kernels run in the same order (a removed installation, F <= T).
"""

import copy

import pytest
import torch
from _tiny import THREE_LAYERS, TINY_PROFILE, rel_err, render, tiny_pipeline, tiny_transformer, transformer_inputs

from freeloc_dist import apply_freeloc, enable_freeloc, remove_freeloc

pytestmark = pytest.mark.unit

PROFILE = THREE_LAYERS  # tests/_tiny.py: one layer of each kind, T = 4


@torch.no_grad()
def _run(model, num_frames, **kw):
    return model(**transformer_inputs(num_frames, **kw))[0]


def _fingerprint(model):
    """Everything an installation could leave behind: instance attributes, hooks, processor objects."""
    return (sorted(vars(model)), dict(model._forward_pre_hooks), dict(model._forward_hooks),
            dict(model.rope._forward_hooks), [(b.attn1.processor, b.attn2.processor) for b in model.blocks])


# ------------------------------------------------------------------------------------------- remove
@pytest.mark.parametrize("how", ["handle", "remove_freeloc"])
def test_remove_restores_stock_bitwise(how):
    model = tiny_transformer(num_layers=3)
    before = _fingerprint(model)
    stock = copy.deepcopy(model)
    handle = apply_freeloc(model, PROFILE)
    assert rel_err(_run(model, 9), _run(stock, 9)) > 1e-4  # installed: F > T differs from stock
    handle.remove() if how == "handle" else remove_freeloc(model)
    assert _fingerprint(model) == before
    for frames in (3, 9):
        assert torch.equal(_run(model, frames), _run(stock, frames))


# ------------------------------------------------------------------------------------------- casts, copies
def test_install_after_a_dtype_cast_equals_install_before():
    before = tiny_transformer(num_layers=3)
    apply_freeloc(before, PROFILE)
    before.to(torch.bfloat16)
    after = tiny_transformer(num_layers=3).to(torch.bfloat16)
    apply_freeloc(after, PROFILE)  # failed: "temporal frequency base other than 10000" (bf16 rope table)
    inputs = transformer_inputs(9)
    inputs["hidden_states"] = inputs["hidden_states"].bfloat16()
    inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"].bfloat16()
    with torch.no_grad():
        assert torch.equal(after(**inputs)[0], before(**inputs)[0])


def test_a_different_frequency_base_is_still_refused():
    model = tiny_transformer(num_layers=3)
    model.rope.freqs_cos[:, : model.rope.t_dim] = torch.cos(torch.arange(64.0)[:, None] * 0.37)
    with pytest.raises(ValueError, match="temporal frequency base"):
        apply_freeloc(model, PROFILE)


def test_deepcopy_of_an_installed_model_is_independent():
    model = tiny_transformer(num_layers=3)
    stock = copy.deepcopy(model)
    apply_freeloc(model, PROFILE)
    freeloc = {f: _run(model, f) for f in (12, 9)}
    twin = copy.deepcopy(model)
    assert twin.freeloc_state is not model.freeloc_state
    assert twin.freeloc_state.key != model.freeloc_state.key  # its own entry in the custom op's registry
    # failed: the copy's grid hook wrote the original's state, the copy planned for the last grid (9)
    assert torch.equal(_run(twin, 12), freeloc[12])
    remove_freeloc(twin)
    assert torch.equal(_run(twin, 9), _run(stock, 9))
    assert torch.equal(_run(model, 9), freeloc[9])  # the original keeps its installation


# ------------------------------------------------------------------------------------------- grids
@pytest.mark.parametrize("backend", ["sdpa", "sdpa-math", "flex"])
@pytest.mark.parametrize("height, width", [(2, 2), (2, 6)])
def test_one_token_row_or_one_token_per_frame_matches_reference(backend, height, width):
    """16x16 px at patch 2 is one token per frame: it crashed ('frames must be evenly strided')."""
    model = tiny_transformer(num_layers=3)
    apply_freeloc(model, PROFILE, backend="reference")
    reference = _run(model, 9, height=height, width=width)
    apply_freeloc(model, PROFILE, backend=backend)
    assert rel_err(_run(model, 9, height=height, width=width), reference) < 1e-5


# ------------------------------------------------------------------------------------------- diffusers' settings
def test_enable_parallelism_is_refused_after_install():
    from diffusers import ContextParallelConfig

    model = tiny_transformer(num_layers=3)
    apply_freeloc(model, PROFILE)
    with pytest.raises(RuntimeError, match="parallelize_pipeline"):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    assert model._parallel_config is None
    remove_freeloc(model)
    assert "enable_parallelism" not in vars(model)  # diffusers' own method again


def test_install_is_refused_on_a_model_diffusers_parallelised():
    """enable_parallelism first (here its record, as from_pretrained(parallel_config=...) leaves it; the
    real call runs on two gloo ranks in test_citizen_dist.py)."""
    model = tiny_transformer(num_layers=3)
    model._parallel_config = object()
    with pytest.raises(RuntimeError, match="parallelize_pipeline"):
        apply_freeloc(model, PROFILE)
    assert "freeloc_state" not in vars(model)
    with pytest.raises(RuntimeError, match="parallel_config"):
        model._parallel_config = None
        apply_freeloc(model, PROFILE)
        model.blocks[0].attn1.processor._parallel_config = object()


def test_set_attention_backend_is_honoured_on_stock_layers():
    stock = tiny_transformer(num_layers=3)
    model = copy.deepcopy(stock)
    apply_freeloc(model, PROFILE)
    for m in (stock, model):
        m.set_attention_backend("_native_math")
    assert all(b.attn1.processor.stock._attention_backend.value == "_native_math" for b in model.blocks)
    assert torch.equal(_run(model, 3), _run(stock, 3))
    model.reset_attention_backend()
    stock.reset_attention_backend()


# ------------------------------------------------------------------------------------------- pipelines
def test_enable_freeloc_on_both_experts_and_remove_after_a_render():
    pipe = tiny_pipeline(two_experts=True)
    stock = render(pipe, 25)
    with pytest.raises(ValueError, match="no profile for 'transformer_2'"):
        enable_freeloc(pipe, {"transformer": TINY_PROFILE})
    assert "freeloc_state" not in vars(pipe.transformer)  # nothing half installed
    handle = enable_freeloc(pipe, {"transformer": TINY_PROFILE, "transformer_2": TINY_PROFILE})
    assert hasattr(pipe.transformer, "freeloc_state") and hasattr(pipe.transformer_2, "freeloc_state")
    freeloc = render(pipe, 25)  # 7 latent frames > T = 5
    assert rel_err(freeloc, stock) > 1e-4
    handle.remove()
    assert torch.equal(render(pipe, 25), stock)
    enable_freeloc(pipe, TINY_PROFILE)  # one profile for every expert
    assert torch.equal(render(pipe, 25), freeloc)


def test_parallelize_pipeline_on_one_process_equals_the_plain_pipeline():
    from freeloc_dist import parallelize_pipeline

    pipe = tiny_pipeline()
    enable_freeloc(pipe, TINY_PROFILE)
    plain = render(pipe, 25)
    handle = parallelize_pipeline(pipe)
    assert rel_err(render(pipe, 25), plain) < 1e-5
    handle.remove()
    assert torch.equal(render(pipe, 25), plain)


def test_compile_flag_reaches_the_config(tmp_path, generate):
    from freeloc_dist.preflight import load_config

    def compile_mode(*flags):
        args = generate._parse_args(["--config", "configs/tiny-random.yaml", *flags])
        return load_config(args.config, generate.overrides_of(args), args.seconds).model.compile

    assert compile_mode("--compile", "blocks") == "blocks"
    assert compile_mode() == "none"
