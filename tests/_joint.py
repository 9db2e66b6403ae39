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
