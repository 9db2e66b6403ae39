"""Sequence/CFG parallel runs (2-4 gloo processes under torchrun) against one process.

Tolerance 1e-5 relative, as in test_attention.py: the parallel paths change only the order of
float32 reductions (log-sum-exp merges across ranks, head-split matmuls).
"""

import os
import subprocess
import sys
import time

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
def single_process(num_frames, heads, backend="sdpa"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents, cond, uncond = case_inputs(num_frames)
    model = build(heads, backend)
    pred = predict_noise(model, latents, torch.tensor(700.0), cond, uncond, GUIDANCE)
    final = sample(model, FlowMatchEulerDiscreteScheduler(shift=3.0), latents.clone(), cond, uncond, steps=2,
                   guidance=GUIDANCE)
    return pred, final


@pytest.mark.parametrize(
    "nproc, cfg, frames",
    [(1, 1, 9), (2, 1, 11), (3, 1, 10), (4, 2, 11), (4, 1, 10)],
    ids=["world1", "sp2", "sp3", "cfg2xsp2", "sp4"],
)
@pytest.mark.dist
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
            if sp > 1:  # rank 0's received bytes equal the byte model, for every strategy
                measured, predicted = results[f"vrpr_bytes/h{heads}/{strategy}"]
                assert measured == predicted > 0, (heads, strategy, measured, predicted)
        assert rel_err(results[f"latents/h{heads}"], final) < TOL
        if sp > 1:
            chosen = results[f"strategy/h{heads}"]
            u = max(x for x in range(1, sp + 1) if sp % x == 0 and heads % x == 0)
            assert chosen["vrpr"] == ("ulysses" if u == sp else "hybrid" if u > 1 else "ring")
            assert set(results[f"bytes/h{heads}"]) >= {"tsa", "vrpr", "full", "gather"}


@pytest.fixture(scope="module")
def flex_world(tmp_path_factory):
    """One 3-rank world runs both flex cases (the strategies at 10 frames, the long range at 13 with 6 heads under
    neighbour exchange and Ulysses): each rank compiles flex on CPU once for both."""
    out = tmp_path_factory.mktemp("flex") / "flex.pt"
    proc = launch(3, out, "--case", "flex", "--frames", "10", "--long-frames", "13", "--heads", "6",
                  "--strategies", "auto,ulysses")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out)


@pytest.mark.dist
def test_flex_backend_parallel_equals_single_process(flex_world):
    """The flex backend under every strategy on 3 uneven shards: Ulysses runs flex on whole frames, neighbour
    exchange runs it on the local plus received key frames, ring (which needs log-sum-exp) the grouped
    kernel; all against one process running flex."""
    results = flex_world["equivalence"]
    pred, final = single_process(10, 6, backend="flex")
    for strategy in strategies_for(6, 3):
        assert rel_err(results[f"pred/h6/{strategy}"], pred) < TOL, strategy
    assert rel_err(results["latents/h6"], final) < TOL


@pytest.mark.dist
def test_tsa_bytes_match_the_plan_and_do_not_grow_with_length(tmp_path):
    out = tmp_path / "bytes"
    proc = launch(3, out, "--frames", "12", "--case", "bytes")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(3):
        per_length = torch.load(f"{out}.rank{rank}")
        for frames, counts in per_length.items():
            assert counts["measured"] == counts["predicted"] > 0, (rank, frames, counts)
        assert per_length[12]["measured"] == per_length[24]["measured"], (rank, per_length)


@pytest.mark.dist
def test_a_failing_rank_stops_every_rank(tmp_path):
    timeout = 30
    start = time.perf_counter()
    proc = launch(2, tmp_path / "x.pt", "--frames", "9", "--fail-rank", "1", "--timeout", str(timeout))
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr
    assert time.perf_counter() - start < timeout + 30


@pytest.mark.dist
def test_sequence_parallel_group_honours_the_timeout(tmp_path):
    """parallel.timeout_s reaches the groups the engine talks on (torch gives a new_group gloo's 30-minute default
    unless told), so a collective one rank never joins fails in about timeout_s."""
    timeout = 2
    proc = launch(2, tmp_path / "t.pt", "--frames", "9", "--case", "group-timeout", "--timeout", str(timeout))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = torch.load(f"{tmp_path / 't.pt'}.rank0")
    assert result["error"] is not None and timeout <= result["elapsed"] < 3 * timeout, result


@pytest.mark.cli
def test_cli_rejects_bad_input_on_every_rank(tmp_path):
    # Each rank alone, as torchrun starts it: the error must come before any rendezvous (no peer needed).
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"}
    cmd = [sys.executable, os.path.join(ROOT, "launch", "generate.py"), "--config", "configs/tiny-random.yaml",
           "--frames", "64", "--out", str(tmp_path / "x.mp4")]
    for rank in (0, 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)})
        assert proc.returncode == 2
        want = f"[rank {rank}] error: config error: video.frames=64: must be 4k+1 (e.g. 61 or 65)"
        assert proc.stderr.strip() == want
    assert not (tmp_path / "x.mp4").exists()


@pytest.mark.cli
def test_cli_rejects_more_ranks_than_frames(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "8", "RANK": "3", "LOCAL_RANK": "3"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "generate.py"), "--config",
                           "configs/tiny-random.yaml", "--frames", "9"], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env=env)
    assert proc.returncode == 2
    assert "8 ranks give 8 sequence-parallel ranks but the video has only 3 latent frames" in proc.stderr


@pytest.mark.dist
def test_torchrun_render_equals_single_process(tmp_path):
    """Issue 3's acceptance check: the CLI under torchrun writes the latents of a plain run."""
    from safetensors.torch import load_file

    base = [os.path.join(ROOT, "launch", "generate.py"), "--config", "configs/tiny-random.yaml", "--frames", "33",
            "--steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "a.mp4"), "--save-latents",
                             str(tmp_path / "a.safetensors")], capture_output=True, text=True, cwd=ROOT, env=env)
    assert single.returncode == 0, single.stderr[-3000:]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *base, "--out", str(tmp_path / "b.mp4"), "--save-latents", str(tmp_path / "b.safetensors"),
                            "--report-comm"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = (load_file(tmp_path / f"{x}.safetensors")["latents"] for x in "ab")
    assert rel_err(b, a) < TOL
    assert "rank 1:" in multi.stderr and "tsa=" in multi.stderr
    # the decode was spread over both ranks (freeloc_dist/decode.py) and wrote the whole video
    from freeloc_dist.video import read_mp4_frame_count

    assert read_mp4_frame_count(tmp_path / "b.mp4") == read_mp4_frame_count(tmp_path / "a.mp4") == 33
    assert "decoded on 2 ranks" in multi.stderr


@torch.no_grad()
def _single_long(num_frames, heads, backend):
    from dist_worker import build_long

    latents, cond, uncond = case_inputs(num_frames)
    return predict_noise(build_long(heads, backend), latents, torch.tensor(700.0), cond, uncond, GUIDANCE)


# Every strategy is covered: sp 2 with 6 heads (Ulysses), sp 3 with 5 heads (ring, degenerate hybrid), flex under
# neighbour exchange (auto) and Ulysses (flex_world); all with frame counts that do not divide.
@pytest.mark.parametrize("nproc, frames, heads", [(2, 11, 6), (3, 13, 5)], ids=["sp2", "sp3"])
@pytest.mark.dist
def test_long_range_parallel_equals_single_process(tmp_path, nproc, frames, heads):
    """Long-range dense layers (issue 18) under every strategy equal one process; their bytes equal the byte
    model; auto serves them by neighbour exchange, which receives only the band, the key frames and the sinks."""
    out = tmp_path / "long.pt"
    proc = launch(nproc, out, "--frames", str(frames), "--case", "long", "--heads", str(heads))
    assert proc.returncode == 0, proc.stderr[-4000:]
    _check_long_range(torch.load(out), nproc, frames, "sdpa", heads, None)


@pytest.mark.dist
def test_flex_long_range_parallel_equals_single_process(flex_world):
    _check_long_range(flex_world["long"], 3, 13, "flex", 6, "auto,ulysses")


def _check_long_range(results, nproc, frames, backend, heads, only):
    from freeloc_dist.parallel.shards import exchange_plan, frame_shards
    from freeloc_dist.plan import layer_plan

    ref = _single_long(frames, heads, backend)
    for strategy in [s for s in strategies_for(heads, nproc) if only is None or s in only.split(",")]:
        assert rel_err(results[f"pred/h{heads}/{strategy}"], ref) < TOL, (heads, strategy)
        measured, predicted, used = results[f"long_bytes/h{heads}/{strategy}"]
        assert measured == predicted > 0, (heads, strategy, measured, predicted)
    assert results[f"long_bytes/h{heads}/auto"][2] == "neighbour"
    long_range = {"band_frames": 1, "stride_frames": 3, "sink_frames": [0, 4]}
    plan = layer_plan("vrpr", (frames, 2, 3), 4, long_range=long_range)
    shards = frame_shards(frames, nproc)
    ex = exchange_plan(plan, shards)
    s, e = shards.ranges[0]
    allowed = set(range(max(0, s - 1), min(frames, e + 1))) | set(range(0, frames, 3)) | {0, 4}
    assert set(ex.needed[0]) == allowed  # band around the shard, strided key frames, sinks: nothing else
