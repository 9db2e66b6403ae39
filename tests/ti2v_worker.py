"""One rank of test_ti2v_dist.py's image-mode check: Wan2.2 TI2V's image mode (a conditioning image built here,
frame 0 at timestep 0) rendered through render.Session (FreeLOC + the parallel engine, as generate.py builds
them) under torchrun (gloo, CPU), or in one plain process. Rank 0 saves the final latents."""

import argparse
import faulthandler
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from freeloc_dist.config import REPO_ROOT, load_render_config  # noqa: E402
from freeloc_dist.parallel import destroy_parallel, init_parallel  # noqa: E402
from freeloc_dist.profile import load_profile  # noqa: E402
from freeloc_dist.render import Session  # noqa: E402
from freeloc_dist.sampling import render  # noqa: E402


def image(height, width):
    """[1, 3, H, W] in [-1, 1]: gradients and a bright square, so frame 0's latent is far from noise."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    img = torch.stack([x, y, x * y])
    img[:, height // 4 : height // 2, width // 3 : 2 * width // 3] = 0.9
    return img[None]


def main():
    faulthandler.dump_traceback_later(240, exit=True)
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--frames", type=int, required=True)
    parser.add_argument("--cfg-degree", type=int, default=1)
    parser.add_argument("--text-only", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_render_config(REPO_ROOT / "configs" / "tiny-random-ti2v.yaml",
                             {"video.frames": args.frames, "sampling.steps": 3, "parallel.cfg_degree": args.cfg_degree})
    dims = init_parallel(cfg_degree=args.cfg_degree, timeout_s=120)
    try:
        session = Session(cfg, load_profile(cfg.profile), dims, lambda message: None)
        cond = None if args.text_only else image(cfg.video.height, cfg.video.width)
        latents = render(session.parts, cfg, decode=False, predict=session.predict, image=cond).latents
        if dims.rank == 0:
            torch.save(latents, args.out)
    finally:
        destroy_parallel(dims)


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
