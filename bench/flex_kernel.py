"""The compiled flex_attention kernel against SDPA on plain dense attention, per block size and compile mode.

Prints a table; not a test. Every flex layer computes at least its attended pairs with this kernel, so
seconds(flex) / seconds(SDPA) here is a floor for the flex backend's "x dense" in bench/attention.py: on
a CPU where it exceeds 1.25, no flex vrpr layer can meet the 1.25x target, whatever the backend does.

    python bench/flex_kernel.py [--tokens 6144] [--heads 12] [--head-dim 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

BLOCKS = ((32, 32), (32, 128), (64, 64), (128, 128), (128, 512), (256, 512), (512, 512))


def best_of(fn, repeats):
    fn()  # warm-up (compilation on first use)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=6144)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, size, args.head_dim, generator=g) for _ in range(3))
    sdpa = best_of(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.repeats)
    print(f"# L={size}, {args.heads} heads x {args.head_dim}, float32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; SDPA {sdpa:.3f} s")
    print(f"{'block (q, kv)':<14} {'compile mode':<28} {'seconds':>8} {'x SDPA':>7}")
    modes = {"default": torch.compile(flex_attention, dynamic=False),
             "max-autotune-no-cudagraphs": torch.compile(flex_attention, dynamic=False,
                                                         mode="max-autotune-no-cudagraphs")}
    for block in BLOCKS:
        mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 0, None, None, size, size, device="cpu",
                                 BLOCK_SIZE=block)
        for name, flex in modes.items():
            if name != "default" and block != (128, 128):
                continue  # one autotuned row is enough to show the mode does not change the kernel
            sec = best_of(lambda flex=flex, mask=mask: flex(q, k, v, block_mask=mask), args.repeats)
            print(f"{str(block):<14} {name:<28} {sec:8.3f} {sec / sdpa:7.3f}", flush=True)


if __name__ == "__main__":
    main()
