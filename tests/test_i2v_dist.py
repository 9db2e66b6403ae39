"""diffusers' own WanImageToVideoPipeline under parallelize_pipeline at F > T, torchrun (gloo): 2 sequence-parallel
ranks and cfg 2 x sp 2 return the latents of one process (1e-5 relative, as tests/test_parallel.py: only the order
of float32 reductions changes). The CLI's image-to-video renders on every world shape are rows of the family
matrix (tests/test_matrix_dist.py)."""

import os
import subprocess
import sys

import pytest
from _tiny import rel_err

pytestmark = pytest.mark.dist
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


@pytest.mark.parametrize("nproc, cfg", [(2, 1), (4, 2)], ids=["sp2", "cfg2xsp2"])
def test_stock_i2v_pipeline_parallel_equals_one_process(tmp_path, nproc, cfg):
    """parallelize_pipeline on diffusers' own WanImageToVideoPipeline (FreeLOC on, F > T): the 12-channel input
    is sharded by frames, the CLIP tokens reach both CFG groups; every rank returns one process's latents."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from i2v_pipeline_worker import pipeline_and_args

    pipe, args = pipeline_and_args()
    with torch.no_grad():
        want = pipe(**args).frames
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           os.path.join(ROOT, "tests", "i2v_pipeline_worker.py"), "--out", str(tmp_path / "r"), "--cfg", str(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(nproc):
        got = torch.load(tmp_path / f"r.rank{rank}")
        assert rel_err(got, want) < TOL, (rank, rel_err(got, want))
