"""Shared fixtures and the test tiers.

Every test belongs to exactly one tier (a pytest marker, registered in pyproject.toml):
  unit   plan math, kernels, models and loaders in this process (no subprocesses); `make test-fast`
  cli    launch/*.py run as subprocesses, one process each
  dist   several processes under torchrun (gloo on CPU)
  slurm  sbatch recipes on a single-host Slurm cluster
  gpu    needs CUDA; skipped without it
A module of one tier declares it with `pytestmark`; a mixed module marks each test. A test with no tier, or
with two, fails collection, so a new test cannot silently escape `make test-fast` or land in the wrong tier.

`make test` runs the suite on two pytest-xdist workers (`--dist loadgroup`). Each test gets its module as its xdist
group, so a module's fixtures (a torchrun world serving many renders, the GPU check's smoke table, a Slurm cluster) are
built once, on one worker; the Slurm tests are one module, so no two Slurm clusters (whose daemons take fixed ports)
ever overlap. Two torchrun worlds of different modules may run at once (their rendezvous ports are free ones).
xdist carries the group as a suffix of the test's id, which pytest 9.2 silently drops (pytest-xdist#1386: every test
then becomes its own group and module fixtures are built on both workers); the lock pins pytest 9.1.1, and
every test fails (tests/conftest.py, pytest_collection_finish) if the groups did not take effect.
"""

import pytest

TIERS = ("unit", "cli", "dist", "slurm", "gpu")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            raise pytest.UsageError(f"{item.nodeid}: needs exactly one tier marker of {TIERS}, has {tiers}")
        item.add_marker(pytest.mark.xdist_group(_group(item)))
        if tiers == ["gpu"]:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs CUDA (gpu tier)"))


def _group(item) -> str:
    return item.nodeid.split("::")[0]


_GROUPS_LOST = []  # set on an xdist worker whose tests lost their group; every test then fails with it


@pytest.hookimpl(tryfirst=True)  # before xdist sends the collection to the controller
def pytest_collection_finish(session):
    """On an xdist worker under --dist loadgroup, every test id must carry its group, or the grouping is off.
    (A worker that stops here would take its message with it; a failing test shows it.)"""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items if not item.nodeid.endswith("@" + _group(item))]
    if lost:
        _GROUPS_LOST.append(f"pytest-xdist's loadgroup did not take effect ({len(lost)} tests without their group, "
                            f"e.g. {lost[0]}): pytest-xdist#1386; install the lock's pytest (make setup)")


@pytest.fixture(autouse=True)
def _xdist_groups_took_effect():
    if _GROUPS_LOST:
        pytest.fail(_GROUPS_LOST[0], pytrace=False)


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
