"""Shared fixtures and the test tiers.

Every test belongs to exactly one tier (a pytest marker, registered in pyproject.toml):
  unit   plan math, kernels, models and loaders in this process (no subprocesses); `make test-fast`
  cli    launch/*.py run as subprocesses, one process each
  dist   several processes under torchrun (gloo on CPU)
  slurm  sbatch recipes on a single-host Slurm cluster
  gpu    needs CUDA; skipped without it
A module of one tier declares it with `pytestmark`; a mixed module marks each test. A test with no tier, or
with two, fails collection, so a new test cannot silently escape `make test-fast` or land in the wrong tier.
"""

import pytest

TIERS = ("unit", "cli", "dist", "slurm", "gpu")


def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}")
        if tiers == ["gpu"]:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs CUDA (gpu tier)"))


@pytest.fixture(scope="session")
def generate():
    """launch/generate.py loaded as a module, for in-process CLI tests (its main returns the exit code)."""
    from _scripts import load_script

    return load_script("launch/generate.py")


# ---- generation-side fixtures (config / models / sampling / CLI tests) -------------------------------------


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random Wan saved in diffusers format (seed 0), shared by the whole session."""
    from freeloc_dist.families.wan.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-wan"), seed=0)
