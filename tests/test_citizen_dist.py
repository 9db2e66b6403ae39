"""A stock diffusers WanPipeline (and, on 2 ranks, a HunyuanVideoPipeline and a HunyuanVideo15Pipeline, the latter
also with cfg 2) under torchrun (gloo) with
enable_freeloc + parallelize_pipeline equals one process, on every rank. 1e-5 relative in float32: the parallel
paths only reorder float32 reductions (test_parallel.py); the pipeline's scheduler and loop are the same code on
every rank."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from _hunyuan import (
    HUNYUAN15_PROFILE,
    HUNYUAN_LONG,
    HUNYUAN_PROFILE,
    HUNYUAN_SHORT,
    render_hunyuan,
    render_hunyuan15,
    render_hunyuan15_i2v,
    tiny_hunyuan15_i2v_pipeline,
    tiny_hunyuan15_pipeline,
    tiny_hunyuan_pipeline,
)
from _tiny import (
    CACHE_FRAMES,
    CACHE_STEPS,
    CACHES,
    TINY_PROFILE,
    count_full_passes,
    enable_cache,
    rel_err,
    render,
    tiny_pipeline,
)

from freeloc_dist import enable_freeloc

pytestmark = pytest.mark.dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-5
FRAMES = 77  # 20 latent frames = 4x the tiny profile's trained 5


def launch(nproc, out, *extra, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           os.path.join(ROOT, "tests", "pipeline_worker.py"), "--out", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(f"{out}.rank{r}") for r in range(nproc)]


@pytest.fixture(scope="module")
def single():
    """One process, plain pipelines: with FreeLOC and stock, at 4x the trained length; the tiny HunyuanVideo with
    FreeLOC past its trained length and stock at it."""
    freeloc = tiny_pipeline()
    enable_freeloc(freeloc, TINY_PROFILE)
    hunyuan = tiny_hunyuan_pipeline()
    enable_freeloc(hunyuan, HUNYUAN_PROFILE)
    hunyuan15 = tiny_hunyuan15_pipeline()
    enable_freeloc(hunyuan15, HUNYUAN15_PROFILE)
    hunyuan15_i2v = tiny_hunyuan15_i2v_pipeline()
    enable_freeloc(hunyuan15_i2v, HUNYUAN15_PROFILE)
    return {"freeloc": render(freeloc, FRAMES), "stock": render(tiny_pipeline(), FRAMES),
            "hunyuan": render_hunyuan(hunyuan, HUNYUAN_LONG),
            "hunyuan_short": render_hunyuan(tiny_hunyuan_pipeline(), HUNYUAN_SHORT),
            "hunyuan15": render_hunyuan15(hunyuan15), "hunyuan15_i2v": render_hunyuan15_i2v(hunyuan15_i2v)}


@pytest.mark.parametrize("nproc, cfg, cases", [
    (1, 1, "freeloc"),
    (2, 1, "freeloc,stock,engine,mismatch,hunyuan,hunyuan15,hunyuan15_i2v"),
    (3, 1, "freeloc"),
    (2, 2, "freeloc,stock,hunyuan,hunyuan15,hunyuan15_i2v"),
], ids=["world1", "sp2", "sp3", "cfg2"])
def test_stock_pipeline_parallel_equals_one_process(tmp_path, single, nproc, cfg, cases):
    ranks = launch(nproc, tmp_path / "r", "--cfg", str(cfg), "--cases", cases)
    for rank, got in enumerate(ranks):
        for case in cases.split(","):
            if case == "mismatch":
                assert "different inputs" in got["mismatch"], (rank, got["mismatch"])
                continue
            if case.startswith("hunyuan"):  # 2 steps with CFG: 4 forwards per rank, 2 when the groups pair them
                assert got[f"{case}_forwards"] == (2 if cfg == 2 else 4), (rank, case, got[f"{case}_forwards"])
            # hunyuan: a stock HunyuanVideoPipeline with enable_freeloc past T, and at T (stock) through the engine
            for key in ("hunyuan", "hunyuan_short") if case == "hunyuan" else (case,):
                want = single[key if key in ("stock", "hunyuan", "hunyuan_short", "hunyuan15", "hunyuan15_i2v")
                              else "freeloc"]
                assert rel_err(got[key], want) < TOL, (rank, key, rel_err(got[key], want))
        if "freeloc" in got:
            # 2 steps with CFG: 4 transformer forwards per rank, 2 when the CFG groups pair them
            assert got["forwards"] == (2 if cfg == 2 else 4), (rank, got["forwards"])
            # removed after a render: each rank runs the plain stock pipeline again
            assert torch.equal(got["freeloc_removed"], got["plain_short"]), rank


@pytest.fixture(scope="module")
def hooks_world(tmp_path_factory):
    """Two ranks with hooks and caches installed before and after parallelize_pipeline, one launch per cfg degree
    (the sp2 one also runs every cache of _tiny.CACHES)."""
    worlds = {}

    def get(cfg):
        if cfg not in worlds:
            cases = "hooks_before,hooks_after" + (",caches_before,caches_after" if cfg == 1 else "")
            out = tmp_path_factory.mktemp(f"hooks_cfg{cfg}") / "r"
            worlds[cfg] = launch(2, out, "--cfg", str(cfg), "--cases", cases)
        return worlds[cfg]
    return get


@pytest.mark.parametrize("cfg", [1, 2], ids=["sp2", "cfg2"])
def test_offload_and_diffusers_hooks_before_or_after_parallelize(hooks_world, single, cfg):
    """enable_model_cpu_offload (accelerate: wraps transformer.forward, and at the end of every pipeline call
    restores the forward it saved, then wraps again), a root-level diffusers HookRegistry hook and diffusers'
    pyramid attention broadcast cache (against one process with the same cache), installed
    before or after parallelize_pipeline: two pipeline calls each equal one process (the second one was a
    shape error / gloo assertion when the engine lived in transformer.forward), the CFG pairing still skips the
    uncond forward, and the handle's remove() leaves each rank's plain pipeline."""
    ranks = hooks_world(cfg)
    kinds = ("offload", "registry", "pab") if importlib.util.find_spec("accelerate") else ("registry", "pab")
    for rank, got in enumerate(ranks):
        assert rel_err(got["hooks_before"]["pab_single"], single["freeloc"]) > 1e-3  # the cache changed the video
        for order in ("before", "after"):
            res = got[f"hooks_{order}"]
            for kind in kinds:
                want = res["pab_single"] if kind == "pab" else single["freeloc"]
                for call, video in enumerate(res[kind]):
                    err = rel_err(video, want)
                    assert err < TOL, (rank, order, kind, call, err)
                # 2 calls x 2 steps with CFG: 8 forwards per rank, 4 when the CFG groups pair them (not under a
                # stateful cache: it counts the calls it sees, so every call runs)
                paired = cfg == 2 and kind != "pab"
                assert res[f"{kind}_forwards"] == (4 if paired else 8), (rank, order, kind, res[f"{kind}_forwards"])
                assert torch.equal(res[f"{kind}_removed"], res["plain_short"]), (rank, order, kind)
            assert res["registry_calls"] >= 4, (rank, order)  # the diffusers hook really ran


def test_caches_decide_once_for_the_whole_video(hooks_world):
    """diffusers' first block cache (thresholds 0.05, 0.1, 0.3), MagCache, SeaCache, TaylorSeer and TextKVCache,
    enabled before or after parallelize_pipeline: two pipeline calls on 2 ranks equal one process with the same
    cache, and the last block ran as often as in one process. The first block cache and SeaCache decide from
    activations (each rank holds its own frames): the engine makes each decision the whole video's."""
    ranks = hooks_world(1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a few tiny renders: threads only contend
    try:
        plain = tiny_pipeline()
        enable_freeloc(plain, TINY_PROFILE)
        no_cache = render(plain, CACHE_FRAMES, num_inference_steps=CACHE_STEPS)
        for name in CACHES:
            pipe = tiny_pipeline()
            enable_freeloc(pipe, TINY_PROFILE)
            enable_cache(pipe, name)
            full = count_full_passes(pipe)
            # one process, one call: a pipeline call starts the cache afresh, so a second call is the same
            want = render(pipe, CACHE_FRAMES, num_inference_steps=CACHE_STEPS)
            if name not in ("first_block_0.05", "text_kv"):  # these change nothing on the tiny model in 8 steps
                assert rel_err(want, no_cache) > 1e-3, name
            if name in ("first_block_0.1", "first_block_0.3", "mag", "sea"):  # skipped whole passes
                assert len(full) < 2 * CACHE_STEPS, (name, len(full))
            for rank, got in enumerate(ranks):
                for order in ("before", "after"):
                    res = got[f"caches_{order}"]
                    for call in range(2):
                        err = rel_err(res[name][call], want)
                        assert err < TOL, (rank, order, name, call, err)
                    assert res[f"{name}_full"] == 2 * len(full), (rank, order, name, res[f"{name}_full"], len(full))
    finally:
        torch.set_num_threads(threads)


def test_diffusers_parallelism_is_refused_in_either_order(tmp_path):
    ranks = launch(2, tmp_path / "r", "--cases", "refuse")
    for got in ranks:
        for name, message in got["refuse"].items():
            assert "parallelize_pipeline" in message, (name, message)


def test_compiled_blocks_under_the_engine_equal_eager(tmp_path):
    ranks = launch(2, tmp_path / "r", "--cases", "compile", timeout=600)
    for got in ranks:
        assert got["graphs"] > 0  # the blocks really ran compiled
        assert rel_err(got["compiled"], got["eager"]) < TOL
