"""Sequence/CFG parallel runs (2-4 gloo processes under torchrun) against one process.

Tolerance 1e-5 relative, as in test_attention.py: the parallel paths change only the order of
float32 reductions (log-sum-exp merges across ranks, head-split matmuls).
"""

import os
import subprocess
import sys

import pytest
import torch
from _tiny import rel_err
from dist_worker import GUIDANCE, build, case_inputs, strategies_for

from freeloc_dist.sampling import predict_noise, sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5


def launch(nproc, out, *extra, timeout=300):
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
        os.path.join(ROOT, "tests", "dist_worker.py"), "--out", str(out), *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@torch.no_grad()
def single_process(num_frames, heads):
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents, cond, uncond = case_inputs(num_frames)
    model = build(heads)
    pred = predict_noise(model, latents, torch.tensor(700.0), cond, uncond, GUIDANCE)
    final = sample(model, FlowMatchEulerDiscreteScheduler(shift=3.0), latents.clone(), cond, uncond, steps=2,
                   guidance=GUIDANCE)
    return pred, final


@pytest.mark.parametrize(
    "nproc, cfg, frames",
    [(1, 1, 9), (2, 1, 11), (3, 1, 10), (4, 2, 11)],
    ids=["world1", "sp2", "sp3", "cfg2xsp2"],
)
def test_parallel_equals_single_process(tmp_path, nproc, cfg, frames):
    out = tmp_path / "result.pt"
    proc = launch(nproc, out, "--frames", str(frames), "--cfg", str(cfg))
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = torch.load(out)
    sp = nproc // cfg
    for heads in (6, 5):
        pred, final = single_process(frames, heads)
        for strategy in strategies_for(heads, sp):
            assert rel_err(results[f"pred/h{heads}/{strategy}"], pred) < TOL, (heads, strategy)
        assert rel_err(results[f"latents/h{heads}"], final) < TOL
        if sp > 1:
            chosen = results[f"strategy/h{heads}"]
            assert chosen["vrpr"] == ("ulysses" if heads % sp == 0 else "ring")
            assert set(results[f"bytes/h{heads}"]) >= {"tsa", "vrpr", "full", "gather"}
