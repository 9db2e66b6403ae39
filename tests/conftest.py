import pytest

# ---- generation-side fixtures (config / models / sampling / CLI tests) -------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Wan saved in diffusers format (seed 0), shared by the whole session."""
    from freeloc_dist.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-wan"), seed=0)


# ---- end of generation-side fixtures ---------------------------------------------------------------------
