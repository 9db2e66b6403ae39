"""Helper of the joint-attention families' tests (test_hunyuan, test_hunyuan15): one transformer call with FreeLOC
installed, removed again whatever happens."""

import torch


def with_freeloc(model, inputs: dict, profile, *, backend: str = "sdpa", route_stock: bool = False) -> torch.Tensor:
    """The model's output for `inputs` with `profile` installed on `backend`; `route_stock`: stock plans forced
    through FreeLOC's path too (as sequence parallelism forces them)."""
    from freeloc_dist import apply_freeloc

    handle = apply_freeloc(model, profile, backend=backend)
    try:
        model.freeloc_state.route_stock = route_stock
        with torch.no_grad():
            return model(**inputs)[0]
    finally:
        handle.remove()


def assert_sdpa_is_the_reference(model, inputs: dict, profile) -> None:
    """At F > T: FreeLOC on sdpa equals the float64 reference backend (1e-4: float32 against float64 through the
    whole model), and it changed the output (> 1e-3 from stock), so the comparison is not stock against stock."""
    with torch.no_grad():
        stock = model(**inputs)[0]
    sdpa, reference = (with_freeloc(model, inputs, profile, backend=b) for b in ("sdpa", "reference"))
    assert (sdpa - reference).abs().max() < 1e-4
    assert (sdpa - stock).abs().max() > 1e-3


def freeloc_render(parts, config, overrides: dict):
    """(render config, final latents) of the render loop on `config` with `overrides`, its profile installed for
    the render only (what a stock pipeline with enable_freeloc is compared against)."""
    from freeloc_dist.config import load_render_config
    from freeloc_dist.install import apply_freeloc
    from freeloc_dist.sampling import render

    cfg = load_render_config(config, overrides)
    handle = apply_freeloc(parts.transformer, cfg.profile)
    try:
        return cfg, render(parts, cfg, decode=False).latents
    finally:
        handle.remove()
