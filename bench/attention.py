"""Per-layer attention time on CPU: stock dense SDPA vs FreeLOC vrpr and tsa, for each backend.

Prints a table; not a test. Targets (issue 2): vrpr <= 1.25x dense; tsa <= 1.3 x density x dense,
"dense" being stock SDPA. Default grid: Wan2.1's T=21 at F = 4T = 84 latent frames, 16 x 16 tokens per
frame, 12 heads x 64.

With the flex backend it also times the compiled flex kernel on plain dense attention (every block
full, the backend's block size): the floor of any flex layer, since a flex layer computes at least its
attended pairs with that kernel. "x own dense" divides by that floor for flex rows (by SDPA otherwise).

    python bench/attention.py [--frames 84] [--height 16 --width 16] [--heads 12] [--head-dim 64] [--threads N]

On a shared machine, --threads 1 gives steadier ratios (every variant runs under the same conditions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freeloc_dist.attention import get_backend  # noqa: E402
from freeloc_dist.plan import layer_plan  # noqa: E402
from freeloc_dist.rope import TemporalRope  # noqa: E402


def wan_rotary(grid, head_dim, t_rope):
    """Wan-style (cos, sin) [1, L, 1, d] with natural positions, built like diffusers' rope."""
    num_frames, h, w = grid
    hw_dim = 2 * (head_dim // 6)
    parts = []
    for dim, count in ((t_rope.t_dim, num_frames), (hw_dim, h), (hw_dim, w)):
        inv = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        parts.append(torch.outer(torch.arange(count, dtype=torch.float64), inv).repeat_interleave(2, dim=1))
    ang = torch.cat(
        [
            parts[0][:, None, None].expand(num_frames, h, w, -1),
            parts[1][None, :, None].expand(num_frames, h, w, -1),
            parts[2][None, None, :].expand(num_frames, h, w, -1),
        ],
        dim=-1,
    ).reshape(1, num_frames * h * w, 1, -1)
    return ang.cos(), ang.sin()


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=84)
    ap.add_argument("--trained-frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--backends", default="sdpa,flex")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    grid = (args.frames, args.height, args.width)
    size = args.frames * args.height * args.width
    head_dim = args.head_dim
    t_rope = TemporalRope(t_dim=head_dim - 4 * (head_dim // 6))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, size, args.heads, head_dim, generator=g) for _ in range(3))
    rotary = wan_rotary(grid, head_dim, t_rope)
    print(
        f"# grid F={args.frames} x {args.height}x{args.width} (L={size}), {args.heads} heads x {head_dim}, "
        f"T={args.trained_frames}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    from freeloc_dist.rope import apply_rotary

    qr, kr = apply_rotary(q, *rotary).transpose(1, 2), apply_rotary(k, *rotary).transpose(1, 2)
    vt = v.transpose(1, 2)
    dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(qr, kr, vt), args.repeats)
    rows = [("dense SDPA (stock)", "-", 1.0, dense, 1.0, None)]
    own_dense = {}
    for backend in args.backends.split(","):
        run = get_backend(backend).run
        own_dense[backend] = dense
        if backend == "flex":
            floor = dense_flex_seconds(qr, kr, vt, args.height * args.width, args.repeats)
            own_dense[backend] = floor
            rows.append(("dense flex (floor)", backend, 1.0, floor, floor / dense, None))
        for kind in ("vrpr", "tsa"):
            plan = layer_plan(kind, grid, args.trained_frames)
            density = plan.density()
            t0 = time.perf_counter()
            run(q, k, v, rotary, plan, t_rope)  # warm-up: plan tables, block masks, compilation
            warm = time.perf_counter() - t0
            sec = timed(lambda run=run, plan=plan: run(q, k, v, rotary, plan, t_rope), args.repeats)
            target = 1.25 if kind == "vrpr" else 1.3 * density
            rows.append((kind, backend, density, sec, sec / dense, (target, warm, sec / own_dense[backend])))

    print(f"{'layer':<20} {'backend':<8} {'density':>8} {'seconds':>9} {'x dense':>8} {'target':>8} {'ok':>4} "
          f"{'x own dense':>12} {'warm-up s':>10}")
    for kind, backend, density, sec, ratio, extra in rows:
        if extra is None:
            print(f"{kind:<20} {backend:<8} {density:8.3f} {sec:9.3f} {ratio:8.3f}")
        else:
            target, warm, own = extra
            ok = "yes" if ratio <= target else "NO"
            print(f"{kind:<20} {backend:<8} {density:8.3f} {sec:9.3f} {ratio:8.3f} {target:8.3f} {ok:>4} "
                  f"{own:12.3f} {warm:10.1f}")


def dense_flex_seconds(q, k, v, tokens_per_frame, repeats):
    """Compiled flex_attention on plain dense attention (all blocks full, no mask_mod) at the flex
    backend's block size: what the kernel alone costs for every pair of the layer."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from freeloc_dist.attention.flex import block_size

    size, blk = q.shape[-2], block_size(tokens_per_frame)
    mask = create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= 0, None, None, size, size, device=str(q.device),
                             BLOCK_SIZE=blk)
    flex = torch.compile(flex_attention, dynamic=False)
    flex(q, k, v, block_mask=mask)  # compile
    return timed(lambda: flex(q, k, v, block_mask=mask), repeats)


if __name__ == "__main__":
    main()
