"""How often a torchrun world aborts at exit after a run that succeeded, with and without
freeloc_dist.parallel.exit.exit_process (the reason it exists).

    .venv/bin/python bench/exit_race.py --worlds 15        # N worlds each way, 3 gloo ranks, prints the counts

Each rank does what a render's last moments do: an all_to_all, batched point-to-point, an all_gather of the
final latents; rank 0 then spends 0.2 s writing while the others tear down and leave. With a plain exit the
interpreter starts finalizing while a gloo worker thread still has to drop the last work's tensors (that needs
the GIL): SIGABRT, "terminate called without an active exception". Counted with --worlds 15 on this 2-core
machine (load average ~10, 2026-12-06): 9 of 15 worlds aborted with a plain exit, 0 of 15 through exit_process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, default=15)
    ap.add_argument("--ranks", type=int, default=3)
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    aborted = {"plain": 0, "exit_process": 0}
    for _ in range(args.worlds):
        for way in aborted:  # interleaved, so both see the same load
            proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                   f"--nproc_per_node={args.ranks}", __file__, RANK_FLAG, way],
                                  capture_output=True, text=True, env=env)
            aborted[way] += proc.returncode != 0
    for way, n in aborted.items():
        print(f"{way:<13} {n} of {args.worlds} worlds aborted at exit")
    return 0


RANK_FLAG = "--rank-program"
if __name__ == "__main__" and RANK_FLAG in sys.argv:
    # One rank, written at module level like a script: what it made stays referenced (the groups, the last
    # works' tensors) until the interpreter finalizes, as a render's objects do (they sit in reference cycles).
    import datetime

    import torch
    import torch.distributed as dist

    from freeloc_dist.parallel.exit import exit_process

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(world)))
    x = torch.randn(world * 21, 1024)
    for _ in range(20):
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        ops = [dist.P2POp(dist.isend, x, (rank + 1) % world),
               dist.P2POp(dist.irecv, torch.empty_like(x), (rank - 1) % world)]
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x, group=group)  # the final latents
    if rank == 0:
        time.sleep(0.2)  # rank 0 writes the video
    dist.destroy_process_group()
    if sys.argv[-1] == "exit_process":
        exit_process(0)
elif __name__ == "__main__":
    raise SystemExit(main())
