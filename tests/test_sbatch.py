"""The sbatch recipes without a cluster: workers per node (FREELOC_NPROC_PER_NODE, SLURM_GPUS_ON_NODE,
nvidia-smi, 1), nothing in them that a CPU cluster rejects, and a log directory that exists. The recipes
themselves run on a test cluster in tests/test_slurm.py."""

import os
import re
import subprocess

import pytest

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.cli

RECIPES = sorted((REPO_ROOT / "launch").glob("*.sbatch"))


def workers(tmp_path, gpus_listed=None, **env):
    """freeloc_workers_per_node with a fake nvidia-smi listing `gpus_listed` GPUs (None: it fails, as
    without a driver)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    smi = fake / "nvidia-smi"
    if gpus_listed is None:
        smi.write_text("#!/bin/sh\nexit 9\n")
    else:
        smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: Fake (UUID: GPU-{i})'\n" for i in range(gpus_listed)))
    smi.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k not in ("FREELOC_NPROC_PER_NODE", "SLURM_GPUS_ON_NODE")}
    return subprocess.run(["bash", "-c", ". launch/slurm_common.sh && freeloc_workers_per_node"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**base, "PATH": f"{fake}:{os.environ['PATH']}", **env})


@pytest.mark.parametrize("gpus_listed, env, expected", [
    (None, {}, "1"),                                                     # a CPU node
    (4, {}, "4"),                                                        # GPUs visible, no GRES allocation
    (4, {"SLURM_GPUS_ON_NODE": "8"}, "8"),                               # sbatch --gpus-per-node=8
    (None, {"SLURM_GPUS_ON_NODE": "0"}, "1"),
    (4, {"SLURM_GPUS_ON_NODE": "8", "FREELOC_NPROC_PER_NODE": "2"}, "2"),  # the user's override wins
])
def test_workers_per_node(tmp_path, gpus_listed, env, expected):
    proc = workers(tmp_path, gpus_listed, **env)
    assert proc.returncode == 0 and proc.stdout.strip() == expected, (proc.stdout, proc.stderr)


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_worker_override_is_a_one_line_error(tmp_path, value):
    proc = workers(tmp_path, None, FREELOC_NPROC_PER_NODE=value)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert proc.stderr.strip() == f"error: FREELOC_NPROC_PER_NODE={value}: must be a positive integer"


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_recipe_runs_on_a_cpu_cluster_as_written(recipe):
    text = recipe.read_text()
    assert subprocess.run(["bash", "-n", str(recipe)], capture_output=True).returncode == 0
    directives = re.findall(r"^#SBATCH\s+(\S+)", text, flags=re.M)
    # A GPU request in the script would make a cluster without GPUs reject the job: GPUs go on the command line.
    assert not [d for d in directives if re.match(r"--(gpus|gres|gpus-per-\w+)(=|$)", d)], directives
    (output,) = [d.split("=", 1)[1] for d in directives if d.startswith("--output=")]
    # Slurm opens the log before the script runs: its directory must exist in the checkout (tracked in git).
    assert (REPO_ROOT / os.path.dirname(output)).is_dir(), output
    tracked = subprocess.run(["git", "ls-files", os.path.dirname(output)], cwd=REPO_ROOT, capture_output=True,
                             text=True).stdout
    assert tracked.strip(), f"{os.path.dirname(output)}/ is not tracked: a fresh clone would not have it"
