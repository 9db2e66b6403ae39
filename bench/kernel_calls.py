"""Kernel calls and host time per attention layer on one rank of P, at Wan2.1-1.3B 480p shapes (issue 26).

For each latent length F and layer kind (stock dense, tsa, vrpr, vrpr + long range), the queries of the middle
rank's shard attend the keys of every frame (as under Ulysses, and as one process does), with the `sdpa`
backend's grouped kernel, batched as on CPU and CUDA:

- fused: fused attention kernel calls per layer; other: every other aten op (attention.calls counts them);
- host ms: wall time of the layer with the fused kernel stubbed (it returns zeros at once), at 1 head x 8
  channels with the call budget scaled so calls batch exactly as at 12 heads x 128, one thread: what the
  host spends per layer (Python, dispatch, the small ops), the floor of a layer on a GPU however fast its
  kernels (median of --repeats runs);
- CPU s: real time of the layer on this CPU at a reduced head count (--real-heads x 128 channels), for
  F <= --real-max-frames (dense attention at F = 241 costs minutes per head here);
- peak MB (--memory): the most resident memory the layer adds over its inputs, at 1 head x 128 channels with
  the fused kernel stubbed (its outputs still allocated) and calls batched as at 12 heads: the accumulators, the
  long range's contiguous copy of its key frames, and the largest call's rotated queries and output; measured as
  the process's peak RSS (getrusage) in a fresh process per row, glibc's mmap threshold fixed so freed tensors
  leave the RSS. Every term scales with the heads.

The long range is the worked example's (configs/profiles/wan2.1-t2v-1.3b-long.yaml: band 8, stride 12, sink 0);
tsa the published defaults (D1 8, D2 24, sink 0, Ds 195). Not a test; prints a markdown table.

    python bench/kernel_calls.py [--frames 81 241 961] [--ranks 8] [--real-max-frames 81] [--threads N] [--memory]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freeloc_dist.attention import sdpa  # noqa: E402
from freeloc_dist.attention.calls import count_calls, stubbed_kernels  # noqa: E402
from freeloc_dist.attention.lse import attend  # noqa: E402
from freeloc_dist.plan import balanced_ranges, layer_plan  # noqa: E402
from freeloc_dist.rope import TemporalRope  # noqa: E402

WAN_HEADS, WAN_HEAD_DIM, WAN_GRID_HW, WAN_T = 12, 128, (30, 52), 21
LONG_RANGE = {"band_frames": 8, "stride_frames": 12, "sink_frames": [0]}
KINDS = ("dense", "tsa", "vrpr", "vrpr+long")


def layer_inputs(num_frames, query_frames, heads, head_dim, n, generator=None):
    """(q, k, v): [B, h, L, d] views of token-major [B, L, h, d] tensors, as the engine passes them."""
    def make(frames):
        shape = (1, frames * n, heads, head_dim)
        x = torch.randn(shape, generator=generator) if generator is not None else torch.zeros(shape)
        return x.transpose(1, 2)

    return make(len(query_frames)), make(num_frames), make(num_frames)


def layer_fn(kind, num_frames, query_frames, t_rope):
    """A function (q, k, v) -> out of one layer of `kind` for `query_frames` against every key frame."""
    if kind == "dense":  # stock attention: one fused call (lse.attend, so stubbed_kernels stubs it too)
        return lambda q, k, v: attend(q, k, v)[0]
    base, _, long = kind.partition("+")
    plan = layer_plan(base, (num_frames, *WAN_GRID_HW), WAN_T, long_range=LONG_RANGE if long else None)
    frames = tuple(range(num_frames))
    # q, k stand in for both their natural and their temporal-position-0 rotations: the calls are the same.
    return lambda q, k, v: sdpa.grouped_attention(q, k, q, k, v, plan, t_rope, query_frames=query_frames,
                                                  key_frames=frames)


def host_row(kind, num_frames, query_frames, repeats):
    """(Calls of the last run, median host seconds) with the fused kernel stubbed, batched as at Wan's heads."""
    heads, head_dim, n = 1, 8, WAN_GRID_HW[0] * WAN_GRID_HW[1]
    t_rope = TemporalRope(t_dim=head_dim - 4 * (head_dim // 6))
    q, k, v = layer_inputs(num_frames, query_frames, heads, head_dim, n)
    fn = layer_fn(kind, num_frames, query_frames, t_rope)
    budget, threads = sdpa.CALL_BUDGET, torch.get_num_threads()
    sdpa.CALL_BUDGET = budget * heads * head_dim // (WAN_HEADS * WAN_HEAD_DIM)  # per-call items as at Wan
    # One thread: the host's work is serial, and on a loaded machine a parallel region over tiny tensors waits
    # for descheduled worker threads (46 ms per 350 KB zero-fill measured with 2 threads here).
    torch.set_num_threads(1)
    try:
        with stubbed_kernels():
            timed(fn, q, k, v)  # warm-up: plan, schedules, caches
        calls = count_calls(fn, q, k, v, stub_fused=True)[0]
        with stubbed_kernels():
            seconds = statistics.median(timed(fn, q, k, v) for _ in range(repeats))
    finally:
        sdpa.CALL_BUDGET = budget
        torch.set_num_threads(threads)
    return calls, seconds


def timed(fn, *args):
    t0 = time.perf_counter()
    with torch.no_grad():
        fn(*args)
    return time.perf_counter() - t0


def real_seconds(kind, num_frames, query_frames, heads, repeats):
    """Median real seconds of the layer on this CPU at `heads` x 128 (the real kernels)."""
    n = WAN_GRID_HW[0] * WAN_GRID_HW[1]
    t_rope = TemporalRope(t_dim=WAN_HEAD_DIM - 4 * (WAN_HEAD_DIM // 6))
    q, k, v = layer_inputs(num_frames, query_frames, heads, WAN_HEAD_DIM, n, torch.Generator().manual_seed(0))
    fn = layer_fn(kind, num_frames, query_frames, t_rope)
    timed(fn, q, k, v)  # warm-up
    return statistics.median(timed(fn, q, k, v) for _ in range(repeats))


def peak_mb(kind, num_frames, query_frames) -> float:
    """MB of resident memory one layer adds over its inputs at 1 head x 128 (this process: call it in a fresh one)."""
    n = WAN_GRID_HW[0] * WAN_GRID_HW[1]
    t_rope = TemporalRope(t_dim=WAN_HEAD_DIM - 4 * (WAN_HEAD_DIM // 6))
    q, k, v = layer_inputs(num_frames, query_frames, 1, WAN_HEAD_DIM, n)
    for x in (q, k, v):
        x.fill_(1.0)  # zeros may be untouched pages; the layer must not be charged for faulting its inputs in
    fn = layer_fn(kind, num_frames, query_frames, t_rope)
    sdpa.CALL_BUDGET = sdpa.CALL_BUDGET // WAN_HEADS  # per-call items as at Wan's 12 heads
    torch.set_num_threads(1)
    page = os.sysconf("SC_PAGE_SIZE")
    with open("/proc/self/statm") as f:
        base = int(f.read().split()[1]) * page
    with stubbed_kernels():
        timed(fn, q, k, v)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(0, peak - base) / 2**20


def peak_mb_fresh(kind, num_frames, ranks) -> float:
    # A fixed mmap threshold: glibc then maps every tensor over 64 KB on its own and unmaps it when freed, so the
    # peak RSS is the peak of live tensors, not of a heap that freed calls left fragmented (its default threshold
    # grows to the largest freed block, which charged a layer up to 2x its live peak here).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak-row", str(num_frames), kind,
                          "--ranks", str(ranks)], check=True, capture_output=True, text=True, env=env).stdout
    return float(out.split()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, nargs="+", default=[81, 241, 961], help="latent frames F")
    ap.add_argument("--ranks", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="host-time runs per row (median)")
    ap.add_argument("--real-heads", type=int, default=1)
    ap.add_argument("--real-max-frames", type=int, default=81, help="real CPU time only up to this F (0: never)")
    ap.add_argument("--real-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--memory", action="store_true", help="add each layer's peak MB (a fresh process per row)")
    ap.add_argument("--peak-row", nargs=2, metavar=("F", "KIND"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak_row:
        num_frames, kind = int(args.peak_row[0]), args.peak_row[1]
        s, e = balanced_ranges(num_frames, args.ranks)[args.ranks // 2]
        print(f"{peak_mb(kind, num_frames, tuple(range(s, e))):.1f}")
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# one rank of {args.ranks} (the middle shard), every key frame present; Wan2.1-1.3B 480p: "
          f"{WAN_HEADS} heads x {WAN_HEAD_DIM}, {WAN_GRID_HW[0]}x{WAN_GRID_HW[1]} tokens per frame, T = {WAN_T}; "
          f"long range band {LONG_RANGE['band_frames']}, stride {LONG_RANGE['stride_frames']}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| F | shard | layer | fused calls | other aten ops | host ms (kernels stubbed) | "
          f"CPU s ({args.real_heads} head{'s' * (args.real_heads > 1)} x {WAN_HEAD_DIM}) |"
          + " peak MB (1 head x 128) |" * args.memory)
    print("|---|---|---|---|---|---|---|" + "---|" * args.memory)
    for num_frames in args.frames:
        s, e = balanced_ranges(num_frames, args.ranks)[args.ranks // 2]
        query_frames = tuple(range(s, e))
        for kind in KINDS:
            calls, host = host_row(kind, num_frames, query_frames, args.repeats)
            real = "-"
            if num_frames <= args.real_max_frames:
                real = f"{real_seconds(kind, num_frames, query_frames, args.real_heads, args.real_repeats):.2f}"
            peak = f" {peak_mb_fresh(kind, num_frames, args.ranks):,.0f} |" if args.memory else ""
            print(f"| {num_frames} | {e - s} | {kind} | {calls.fused:,} | {calls.other:,} | {host * 1e3:,.0f} "
                  f"| {real} |{peak}", flush=True)


if __name__ == "__main__":
    main()
