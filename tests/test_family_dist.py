"""Wan2.2-T2V-A14B's two experts at F > T under torchrun (gloo): 2 and 3 sequence-parallel ranks and
cfg 2 x sp 2 write the latents of one process (1e-5 relative, as tests/test_parallel.py: only the order of
float32 reductions changes), and each expert runs its own profile."""

import os
import subprocess
import sys

import pytest
from _tiny import rel_err

pytestmark = pytest.mark.dist
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
# 33 frames = 9 latent frames (T = 5); 4 steps cross the boundary (t = 875) with shift 3
BASE = [os.path.join(ROOT, "launch", "generate.py"), "--config", "configs/tiny-random-a14b.yaml", "--frames", "33",
        "--steps", "4", "--quiet"]


def render(tmp_path, name, nproc=1, *extra):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    out = tmp_path / f"{name}.safetensors"
    proc = subprocess.run([*launch, *BASE, "--out", str(tmp_path / f"{name}.mp4"), "--save-latents", str(out),
                           *extra], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)["latents"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return render(tmp_path_factory.mktemp("a14b"), "single")


@pytest.mark.parametrize("nproc, extra", [(2, []), (3, []), (4, ["--cfg-degree", "2"])],
                         ids=["sp2", "sp3", "cfg2xsp2"])
def test_two_experts_parallel_equal_one_process(single, tmp_path, nproc, extra):
    assert rel_err(render(tmp_path, "multi", nproc, *extra), single) < TOL


def test_each_expert_runs_its_own_profile(single, tmp_path):
    same = render(tmp_path, "same", 1, "--profile-2", "configs/profiles/tiny-random.yaml")
    assert rel_err(same, single) > 1e-3
