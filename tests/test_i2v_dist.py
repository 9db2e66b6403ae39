"""Image-to-video at F > T under torchrun (gloo): 1, 2 and 3 sequence-parallel ranks and cfg 2 x sp 2 write
the latents of one process (1e-5 relative, as tests/test_parallel.py: only the order of float32 reductions
changes). The conditioning (mask + VAE latents of the whole video) is sliced per rank like the latents and
the CLIP tokens reach every rank and both CFG groups; FLF2V's last-frame sink is fetched across ranks; the
two-expert Wan2.2-I2V-A14B switches experts under cfg 2 x sp 2."""

import os
import subprocess
import sys

import pytest
from _tiny import rel_err

pytestmark = pytest.mark.dist
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
# 33 frames = 9 latent frames (T = 5) at 32x32: 4 tokens per frame; 4 steps (the configs') cross t = 900
SIZE = ["--frames", "33", "--height", "32", "--width", "32", "--quiet"]


def render(tmp_path, config, name, nproc=1, *extra):
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    launch = [sys.executable] if nproc == 0 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={nproc}"]
    out = tmp_path / f"{name}.safetensors"
    proc = subprocess.run([*launch, os.path.join(ROOT, "launch", "generate.py"), "--config", f"configs/{config}",
                           *SIZE, "--out", str(tmp_path / f"{name}.mp4"), "--save-latents", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "", proc.stderr[-3000:]  # --quiet: no warning lines from any rank
    return load_file(out)["latents"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One plain process per model (nproc 0: no torchrun)."""
    folder = tmp_path_factory.mktemp("i2v")
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = render(folder, config, config.removesuffix(".yaml"), 0)
        return cache[config]
    return get


# No torchrun world of 1: at world 1 no engine is installed, so it would compare the one-process path with itself.
@pytest.mark.parametrize("config, nproc, extra", [
    ("tiny-random-i2v.yaml", 2, []),
    ("tiny-random-i2v.yaml", 3, []),
    ("tiny-random-i2v.yaml", 4, ["--cfg-degree", "2"]),
    ("tiny-random-flf2v.yaml", 3, []),
    ("tiny-random-i2v-a14b.yaml", 3, []),
    ("tiny-random-i2v-a14b.yaml", 4, ["--cfg-degree", "2"]),
], ids=["i2v-sp2", "i2v-sp3", "i2v-cfg2xsp2", "flf2v-sp3", "i2v-a14b-sp3", "i2v-a14b-cfg2xsp2"])
def test_i2v_parallel_equals_one_process(single, tmp_path, config, nproc, extra):
    assert rel_err(render(tmp_path, config, "multi", nproc, *extra), single(config)) < TOL


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
