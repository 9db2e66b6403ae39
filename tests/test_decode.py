"""Streaming decode: frames go from the VAE into the mp4 writer one latent frame at a time, so decode
memory does not grow with the video length (unlike the VAE's own whole-video decode).

Memory is measured as the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) in a
child process whose allocator returns freed blocks at once (glibc mmap threshold lowered), so the peak
reflects live memory rather than allocator caching."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from freeloc_dist.config import REPO_ROOT

CHILD = r"""
import json, sys, torch
from freeloc_dist.models import load_components
from freeloc_dist.decode import iter_decode
from freeloc_dist.families.wan.vae import denormalise
from freeloc_dist.video import read_mp4_frame_count, write_mp4
torch.set_num_threads(1)
vae = load_components(sys.argv[1], "float32", "cpu").vae
out = sys.argv[2]

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

def peak(fn):
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM
    base = rss("VmRSS:")
    fn()
    return rss("VmHWM:") - base

def streamed(z):
    write_mp4(out, iter_decode(vae, z), fps=8)

def whole(z):
    with torch.no_grad():
        vae.decode(denormalise(vae, z))

warm = torch.randn(1, 4, 3, 8, 8)
streamed(warm); whole(warm)
result = {}
for f in (4, 28):
    z = torch.randn(1, 4, f, 8, 8, generator=torch.Generator().manual_seed(f))
    result[f"streamed_{f}"] = peak(lambda: streamed(z))
    result[f"frames_{f}"] = read_mp4_frame_count(out)
z = torch.randn(1, 4, 28, 8, 8)
result["whole_4"] = peak(lambda: whole(z[:, :, :4]))
result["whole_28"] = peak(lambda: whole(z))
print(json.dumps(result))
"""


@pytest.mark.cli
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_decode_memory_does_not_grow_with_frames(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "16384", "MALLOC_TRIM_THRESHOLD_": "0",
           "MALLOC_ARENA_MAX": "1"}
    args = [sys.executable, "-c", CHILD, str(REPO_ROOT / "assets" / "tiny-wan"), str(tmp_path / "v.mp4")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["frames_4"] == 13 and r["frames_28"] == 109
    float_video_growth = 4 * 3 * (109 - 13) * 64 * 64  # bytes of the float video between F=4 and F=28 (4.7 MB)
    streamed_growth = r["streamed_28"] - r["streamed_4"]
    whole_growth = r["whole_28"] - r["whole_4"]
    assert whole_growth > 0.5 * float_video_growth, r  # the measurement does see a growing video
    assert streamed_growth < 0.1 * float_video_growth, r  # ... and streaming does not grow with F


@pytest.mark.unit
def test_iter_decode_chunks_concatenate_to_whole_decode(tiny_model_dir):
    from freeloc_dist.decode import iter_decode
    from freeloc_dist.families.wan.vae import denormalise
    from freeloc_dist.models import load_components
    from freeloc_dist.video import to_uint8

    vae = load_components(tiny_model_dir, "float32", "cpu").vae
    z = torch.randn(1, 4, 4, 4, 6, generator=torch.Generator().manual_seed(1))
    chunks = list(iter_decode(vae, z))
    assert [c.shape[0] for c in chunks] == [1, 4, 4, 4]
    with torch.no_grad():
        ref = to_uint8(vae.decode(denormalise(vae, z)).sample)
    assert np.array_equal(np.concatenate(chunks), ref)


@pytest.mark.unit
def test_write_mp4_from_chunks_is_atomic_on_failure(tmp_path):
    from freeloc_dist.video import read_mp4_frame_count, write_mp4

    def chunks(fail):
        yield np.zeros((1, 16, 16, 3), np.uint8)
        yield np.zeros((4, 16, 16, 3), np.uint8)
        if fail:
            raise RuntimeError("killed mid-decode")

    with pytest.raises(RuntimeError):
        write_mp4(tmp_path / "v.mp4", chunks(True), fps=8)
    assert list(tmp_path.iterdir()) == []
    write_mp4(tmp_path / "v.mp4", chunks(False), fps=8)
    assert read_mp4_frame_count(tmp_path / "v.mp4") == 5


@pytest.mark.unit
def test_decode_ranges_with_warmup_equal_one_pass(tiny_model_dir):
    """Any split of the latent frames into ranges (e.g. one per rank) decodes to exactly one pass's frames."""
    from freeloc_dist.decode import iter_decode
    from freeloc_dist.families.wan.vae import decode_warmup_frames
    from freeloc_dist.models import load_components

    vae = load_components(tiny_model_dir, "float32", "cpu").vae
    warmup = decode_warmup_frames(vae)
    assert warmup == 30  # tiny decoder: 10 causal convs at latent rate, 5 at 2x, 9 at 4x (2 frames each)
    num_frames = warmup + 6
    z = torch.randn(1, 4, num_frames, 2, 2, generator=torch.Generator().manual_seed(2))
    whole = np.concatenate(list(iter_decode(vae, z)))
    for start, end in [(0, 3), (3, warmup + 2), (warmup + 2, num_frames)]:
        part = np.concatenate(list(iter_decode(vae, z, start, end)))
        assert np.array_equal(part, whole[max(0, 4 * start - 3):4 * end - 3]), (start, end)


def _spread(model_dir, out, nproc, frames, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(REPO_ROOT / "tests" / "decode_worker.py"), "--model", str(model_dir), "--out", str(out),
           "--frames", str(frames), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO_ROOT)


@pytest.mark.dist
@pytest.mark.parametrize("nproc, frames", [(2, 7), (3, 7), (3, 2)],
                         ids=["2ranks", "3ranks-uneven", "more-ranks-than-frames"])
def test_decode_spread_over_ranks_equals_one_pass(tiny_model_dir, tmp_path, nproc, frames):
    """Each rank decodes a range of latent frames, rank 0 writes them in order: bitwise the frames of one
    single-process pass (uint8, so exact), and rank 0 receives exactly the other ranks' frames."""
    from freeloc_dist.decode import decode_ranges, decode_video, video_frames_of
    from freeloc_dist.models import load_components

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from decode_worker import latents

    proc = _spread(tiny_model_dir, tmp_path / "v.npy", nproc, frames)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = np.load(tmp_path / "v.npy")
    want = decode_video(load_components(tiny_model_dir, "float32", "cpu").vae, latents(frames))
    assert got.shape == want.shape == (4 * (frames - 1) + 1, 64, 64, 3)
    assert np.array_equal(got, want)
    ranges = decode_ranges(frames, nproc)
    others = sum(video_frames_of(s, e, 4) for s, e in ranges[1:])
    assert torch.load(tmp_path / "v.npy.bytes") == ({"decode": others * 64 * 64 * 3} if others else {})


@pytest.mark.dist
def test_decode_stop_on_one_rank_stops_every_rank(tiny_model_dir, tmp_path):
    proc = _spread(tiny_model_dir, tmp_path / "v.npy", 3, 7, "--stop-rank", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("v.npy.stopped*")) == [f"v.npy.stopped{r}" for r in range(3)]
    assert not (tmp_path / "v.npy").exists()


@pytest.mark.unit
def test_decode_ranges_cover_the_video_once():
    from freeloc_dist.decode import decode_ranges, video_frames_of

    for frames in range(1, 30):
        for world in range(1, 10):
            ranges = decode_ranges(frames, world)
            assert len(ranges) == world and ranges[0][0] == 0 and ranges[-1][1] == frames
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges if e > s]
            assert max(sizes) - min(sizes) <= 1
            assert sum(video_frames_of(s, e, 4) for s, e in ranges) == 4 * (frames - 1) + 1
