"""Shared fixtures and the test tiers.

Every test belongs to exactly one tier (a pytest marker, registered in pyproject.toml):
  unit   plan math, kernels, models and loaders in this process (no subprocesses); `make test-fast`
  cli    launch/*.py run as subprocesses, one process each
  dist   several processes under torchrun (gloo on CPU)
  slurm  sbatch recipes on a single-host Slurm cluster
  gpu    needs CUDA; skipped without it
A module of one tier declares it with `pytestmark`; a mixed module marks each test. A test with no tier, or
with two, fails collection, so a new test cannot silently escape `make test-fast` or land in the wrong tier.

`make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`). Each test gets an xdist group here:
every dist and slurm test shares one group, so one worker runs them one after another and no two torchrun
worlds (or Slurm clusters, whose daemons take fixed ports) ever overlap; every other test is grouped by its
module, so a module's fixtures are built once.
"""

import pytest

TIERS = ("unit", "cli", "dist", "slurm", "gpu")


SERIAL_TIERS = ("dist", "slurm")  # several processes each: run one at a time, on one worker


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}")
        group = "multi-process" if tiers[0] in SERIAL_TIERS else item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(group))
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
