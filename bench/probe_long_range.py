"""Probe the testbed toy's dense layers for the sparse long range and write the long profile.

    python bench/probe_long_range.py --out configs/profiles/toy-long.yaml     # the shipped toy-long profile

Inputs: noised ground-truth latents of procedural worlds drawn from training seeds (never the held-out
EVAL_SEED_BASE worlds the quality benches score), at the target length, conditional text; the rule and its
threshold are freeloc_dist.probing.long_range's, written into the profile.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from freeloc_dist.config import REPO_ROOT, load_render_config  # noqa: E402
from freeloc_dist.families.wan import toy as tm  # noqa: E402
from freeloc_dist.families.wan.toy_train import keyframe_latents, noised  # noqa: E402
from freeloc_dist.models import load_components  # noqa: E402
from freeloc_dist.probing.decide import write_profile  # noqa: E402
from freeloc_dist.probing.long_range import DEFAULT_THRESHOLD, long_range_profile, measure_long_range  # noqa: E402
from freeloc_dist.probing.prober import ProbeInput  # noqa: E402
from freeloc_dist.profile import load_profile  # noqa: E402
from freeloc_dist.sampling import encode_prompt  # noqa: E402
from freeloc_dist.testbed import world as tw  # noqa: E402

PROBE_SEEDS = (7, 8)  # training-range world seeds (< EVAL_SEED_BASE): calibration, not evaluation


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs/tiny.yaml")
    p.add_argument("--length", type=int, default=12, help="target length, multiple of T")
    p.add_argument("--band", type=int, default=4)
    p.add_argument("--stride", type=int, default=6)
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 0.9])
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_render_config(a.config)
    prof = load_profile(cfg.profile)
    parts = load_components(cfg.model.path, cfg.model.dtype)
    transformer = parts.transformer.eval()
    f = a.length * prof.trained_frames
    frames = 4 * (f - 1) + 1
    inputs = []
    with torch.no_grad():
        for seed in PROBE_SEEDS:
            w = tw.sample_world(seed)
            x0 = keyframe_latents(parts.vae.config, tw.render(w, frames, tm.VIDEO_SIZE, 4)[None], frames)
            text = encode_prompt(parts, w.prompt, tm.MAX_TEXT_TOKENS)[0][None]
            for j, s in enumerate(a.noise):
                e = torch.randn(x0.shape, generator=torch.Generator().manual_seed(100 * seed + j))
                xs, _ = noised(x0, torch.tensor([s]), e)
                inputs.append(ProbeInput(latents=xs, timestep=torch.tensor(s * 1000.0), text=text))
    params = {"band_frames": a.band, "stride_frames": a.stride, "sink_frames": [0]}
    start = time.perf_counter()
    changes = measure_long_range(transformer, prof, inputs, params, backend=cfg.attention_backend,
                                 log=lambda m: print(f"[{time.perf_counter() - start:5.0f}s] {m}", flush=True))
    desc = f"{len(PROBE_SEEDS)} training-seed worlds x noise {a.noise} (bench/probe_long_range.py)"
    m = long_range_profile(prof, params, changes, a.threshold, target_frames=f, inputs=desc)
    write_profile(a.out, m)
    print(f"wrote {a.out}: long range on {m.get('long_range', {}).get('layers', [])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
