"""Eager vs torch.compile of a FreeLOC-installed Wan transformer forward on CPU (float32), at a mid size.

Prints, per mode (eager, blocks = compile_repeated_blocks(fullgraph=True), full = torch.compile), the first
call (compile included), the median of the following calls, the speed-up over eager and the relative error
against eager; and the number of dynamo frame compilations between the warm-up and the timed calls (0: no
recompilation from one denoising step to the next; every timed call uses a new timestep). Not a test.

    python bench/compile.py [--frames 16] [--height 16 --width 16] [--layers 4] [--heads 8] [--head-dim 64]
        [--repeats 5] [--threads N] [--modes eager,blocks,full]

Default: F = 16 latent frames, 4x the profile's trained 4, 8 x 8 tokens per frame (1024 tokens), 4 layers of
8 heads x 64, one each of tsa / vrpr / full plus one more tsa.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freeloc_dist import apply_freeloc  # noqa: E402
from freeloc_dist.compile import compile_transformer  # noqa: E402


def build(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim, in_channels=16,
        out_channels=16, text_dim=64, freq_dim=64, ffn_dim=4 * args.heads * args.head_dim, num_layers=args.layers,
        rope_max_seq_len=1024,
    ).eval()
    kinds = ["tsa", "vrpr", "full"] + ["tsa"] * (args.layers - 3)
    profile = {"model": "bench", "trained_frames": 4, "source": "bench/compile.py",
               "layers": {k: [i for i, x in enumerate(kinds) if x == k] for k in ("tsa", "vrpr", "full")},
               "tsa": {"dense_frames": 1, "stripe_frames": 3, "sink_frames": [0]}}
    apply_freeloc(model, profile)
    return model


def inputs(args, step):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, args.frames, args.height, args.width, generator=g),
                timestep=torch.tensor([900.0 - 100 * step]), encoder_hidden_states=torch.randn(1, 16, 64, generator=g),
                return_dict=False)


@torch.no_grad()
def run(model, args):
    from torch._dynamo.utils import counters

    t0 = time.perf_counter()
    first = model(**inputs(args, 0))[0]
    first_s = time.perf_counter() - t0
    frames_before = counters["stats"]["unique_graphs"]
    times = []
    for step in range(1, args.repeats + 1):
        t0 = time.perf_counter()
        model(**inputs(args, step))
        times.append(time.perf_counter() - t0)
    return first, first_s, statistics.median(times), counters["stats"]["unique_graphs"] - frames_before


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--height", type=int, default=16)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--modes", default="eager,blocks,full")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = build(args)
    tokens = args.frames * (args.height // 2) * (args.width // 2)
    print(f"# {args.layers} layers, {args.heads} heads x {args.head_dim}, F={args.frames} (T=4), "
          f"{tokens} tokens, float32, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'mode':8} {'first call s':>12} {'median s':>9} {'x eager':>8} {'rel err':>9} {'new graphs':>10}")
    eager = None
    for mode in args.modes.split(","):
        model = copy.deepcopy(base)
        compile_transformer(model, "none" if mode == "eager" else mode)
        out, first_s, median_s, new_graphs = run(model, args)
        if eager is None:
            eager = (out, median_s)
        err = float((out.double() - eager[0].double()).norm() / eager[0].double().norm())
        print(f"{mode:8} {first_s:12.2f} {median_s:9.3f} {eager[1] / median_s:8.2f} {err:9.1e} {new_graphs:10d}")
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
