"""Decode time spread over ranks (freeloc_dist/decode.py): one process vs P gloo processes, same latents.

    python bench/decode.py                      # tiny random VAE (assets/tiny-wan), F = 41 latent frames, P = 1, 2
    python bench/decode.py --model assets/toy-wan --frames 81 --ranks 1 2

Each run launches torchrun with P processes (one thread each); every rank decodes its range and rank 0
writes the mp4 (the frames of other ranks arrive over gloo). Prints seconds from the start of decode to
the closed mp4, per P, and the speed-up. Every rank but 0 also decodes up to `decode_warmup_frames`
(the VAE's causal receptive field) before its range, so the speed-up is bounded by
F / (F/P + warm-up). On a machine with fewer cores than P the ranks share cores and
the figure says nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def _worker(model: str, frames: int, out: str) -> None:
    import torch

    from freeloc_dist.decode import iter_decode_spread
    from freeloc_dist.models import load_components
    from freeloc_dist.parallel import destroy_parallel, init_parallel
    from freeloc_dist.parallel.comm import Comm
    from freeloc_dist.video import write_mp4

    torch.set_num_threads(1)
    dims = init_parallel()
    try:
        vae = load_components(model, "float32", "cpu").vae
        z = torch.randn(1, vae.config.z_dim, frames, 8, 8, generator=torch.Generator().manual_seed(0))
        comm = Comm(dims)
        comm.any_flag(False)  # start together
        start = time.perf_counter()
        chunks = iter_decode_spread(vae, z, comm)
        if dims.rank == 0:
            write_mp4(out, chunks, fps=16)
            print(f"seconds {time.perf_counter() - start:.2f}", flush=True)
        else:
            for _ in chunks:
                pass
    finally:
        destroy_parallel(dims)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO_ROOT / "assets/tiny-wan"))
    p.add_argument("--frames", type=int, default=41, help="latent frames")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--out", default="/tmp/bench_decode.mp4")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        _worker(a.model, a.frames, a.out)
        return 0
    print(f"model {a.model}, {a.frames} latent frames = {4 * (a.frames - 1) + 1} video frames, {os.cpu_count()} cores")
    print("| ranks | seconds | speed-up |\n|---|---|---|")
    base = None
    for ranks in a.ranks:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               __file__, "--worker", "--model", a.model, "--frames", str(a.frames), "--out", a.out]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            return 1
        seconds = float(next(ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("seconds")))
        base = base or seconds
        print(f"| {ranks} | {seconds:.2f} | {base / seconds:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    from freeloc_dist.parallel.exit import exit_process

    exit_process(main())
