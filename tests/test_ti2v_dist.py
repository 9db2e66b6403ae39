"""Wan2.2 TI2V's image mode at F > T under torchrun (gloo): 3 sequence-parallel ranks and cfg 2 x sp 2 give the
latents of one process (1e-5 relative, as tests/test_parallel.py: only the order of float32 reductions changes).
Through render.Session (tests/ti2v_worker.py), where frame 0's tokens have timestep 0 and the others t, so a
per-token timestep slice that is off by a frame on any rank changes the result (in text mode, which the family
matrix runs end to end through launch/generate.py in tests/test_matrix_dist.py, every token's timestep is the
same)."""

import os
import subprocess
import sys

import pytest
import torch
from _tiny import rel_err

pytestmark = pytest.mark.dist
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
WORKER = os.path.join(ROOT, "tests", "ti2v_worker.py")


def launch(nproc):
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def image_render(tmp_path, name, nproc, *extra):
    out = tmp_path / f"{name}.pt"
    # 37 frames = 10 latent frames: shards 4/3/3 on 3 ranks, 5/5 on 2
    proc = subprocess.run([*launch(nproc), WORKER, "--out", str(out), "--frames", "37", *extra],
                          capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def image_single(tmp_path_factory):
    return image_render(tmp_path_factory.mktemp("ti2v-image"), "single", 1)


@pytest.mark.parametrize("nproc, extra", [(3, []), (4, ["--cfg-degree", "2"])], ids=["sp3", "cfg2xsp2"])
def test_image_mode_parallel_equals_one_process(image_single, tmp_path, nproc, extra):
    assert rel_err(image_render(tmp_path, "multi", nproc, *extra), image_single) < TOL
