"""Time of one sampling step of the testbed's toy with the long range on its dense layers vs without (issue 26).

A step is one guided prediction (conditional and unconditional forward, guidance 4), as the sampler runs it,
on the toy (configs/tiny.yaml: assets/toy-wan, T = 13) with `freeloc` (configs/profiles/toy.yaml) and
`freeloc-long` (toy-long.yaml: a long range, band 5 / stride 7, on its three vrpr layers). Each method has its
own copy of the transformer, warmed up once (plans and schedules are built per shape, not per step); the
steps are then timed A/B interleaved (the order alternates every repeat), so that a shared machine's load hits
both alike; the table gives the median of each and the median of the per-repeat ratios.

    python bench/long_range_step.py [--frames 621 961] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from freeloc_dist.config import REPO_ROOT, load_render_config  # noqa: E402
from freeloc_dist.families.wan import toy as tm  # noqa: E402
from freeloc_dist.methods import get_method  # noqa: E402
from freeloc_dist.models import load_components  # noqa: E402
from freeloc_dist.profile import load_profile  # noqa: E402
from freeloc_dist.sampling import encode_prompt  # noqa: E402

METHODS = ("freeloc", "freeloc-long")
GUIDANCE = 4.0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs/tiny.yaml")
    p.add_argument("--frames", type=int, nargs="+", default=[621, 961], help="video frames (4k+1)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = load_render_config(a.config)
    trained = load_profile(cfg.profile).trained_frames
    parts = load_components(cfg.model.path, cfg.model.dtype)
    base = parts.transformer.eval()
    with torch.no_grad():
        cond = encode_prompt(parts, cfg.prompt, tm.MAX_TEXT_TOKENS)[0][None]
        uncond = encode_prompt(parts, "", tm.MAX_TEXT_TOKENS)[0][None]
    print(f"# toy (T = {trained}), one guided step (2 forwards), {a.threads} thread(s), torch {torch.__version__}, "
          f"{a.repeats} A/B-interleaved repeats")
    print("| video frames | latent frames | freeloc s/step | freeloc-long s/step | long / plain (median of ratios) |")
    print("|---|---|---|---|---|")
    for frames in a.frames:
        latent = (frames - 1) // 4 + 1
        x = torch.randn(1, base.config.in_channels, latent, tm.VIDEO_SIZE // 8, tm.VIDEO_SIZE // 8,
                        generator=torch.Generator().manual_seed(0))
        t = torch.tensor([700.0])
        runs = {}
        for name in METHODS:
            method = get_method(name, trained_frames=trained, profile=cfg.profile, backend=cfg.attention_backend)
            model = copy.deepcopy(base)
            method.install(model, latent)
            runs[name] = (method, model)
        for method, model in runs.values():
            step(method, model, x, t, cond, uncond)  # warm-up: plans, schedules
        times = {name: [] for name in METHODS}
        for r in range(a.repeats):
            for name in (METHODS if r % 2 == 0 else METHODS[::-1]):
                times[name].append(step(*runs[name], x, t, cond, uncond))
        plain, long = (statistics.median(times[m]) for m in METHODS)
        ratio = statistics.median(b / a for a, b in zip(*(times[m] for m in METHODS)))
        print(f"| {frames} | {latent} | {plain:.2f} | {long:.2f} | {ratio:.2f} |", flush=True)
    return 0


def step(method, model, x, t, cond, uncond) -> float:
    """Seconds of one guided prediction (the sampler's step without the scheduler update)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        method.predict(model, x, t, cond, uncond, GUIDANCE)
    return time.perf_counter() - t0


if __name__ == "__main__":
    raise SystemExit(main())
