"""One rank of the spread-decode test (test_decode.py), launched through torchrun (gloo on CPU).

Every rank decodes its range of the same latents with freeloc_dist.decode.iter_decode_spread; rank 0 saves the
frames it wrote, in order, and the bytes it received. With --stop-rank r, rank r asks to stop after its
range and every rank must report DecodeStopped (no rank left waiting)."""

import argparse
import faulthandler
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freeloc_dist.decode import DecodeStopped, iter_decode_spread  # noqa: E402
from freeloc_dist.models import load_components  # noqa: E402
from freeloc_dist.parallel import destroy_parallel, init_parallel  # noqa: E402
from freeloc_dist.parallel.comm import Comm  # noqa: E402


def latents(num_frames: int) -> torch.Tensor:
    return torch.randn(1, 4, num_frames, 8, 8, generator=torch.Generator().manual_seed(num_frames))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--frames", type=int, required=True)
    ap.add_argument("--block-frames", type=int, default=3)
    ap.add_argument("--stop-rank", type=int, default=-1)
    args = ap.parse_args()
    faulthandler.dump_traceback_later(120, exit=True)
    torch.set_num_threads(1)
    dims = init_parallel(timeout_s=120)
    try:
        vae = load_components(args.model, "float32", "cpu").vae
        comm = Comm(dims)
        try:
            chunks = list(iter_decode_spread(vae, latents(args.frames), comm, block_frames=args.block_frames,
                                             stop=lambda: dims.rank == args.stop_rank))
        except DecodeStopped:
            open(f"{args.out}.stopped{dims.rank}", "w").close()
            return
        if dims.rank == 0:
            np.save(args.out, np.concatenate(chunks))
            torch.save(dict(comm.bytes), f"{args.out}.bytes")
        else:
            assert chunks == [], "only rank 0 yields frames"
    finally:
        destroy_parallel(dims)


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
