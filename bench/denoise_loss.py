"""Denoising loss of the testbed's toy vs video length, per method: long-video degradation at the model level.

    python bench/denoise_loss.py                                  # 8 held-out worlds, 1x / 4x / 12x
    python bench/denoise_loss.py --frames 961                     # and the one-minute length (241 latent frames)
    python bench/denoise_loss.py --model runs/x/toy-wan --profile runs/x/profile.yaml   # another checkpoint

The quality table (bench/quality.py) scores sampled videos; this scores the model's one-step predictions,
which need no sampler and no decoder. For each held-out world (seeds from EVAL_SEED_BASE, never seen in
training) and length F = k T latent frames, the world's ground-truth latents are noised at fixed levels s
(x_s = (1 - s) x0 + s e) and each method predicts the flow with the conditional pass only (guidance 1);
the number is the training objective, the mean squared error against e - x0. The noise of a pair is drawn
once for the longest length and sliced, so the first T frames have the same content and the same noise at
every length: the `first T` column compares exactly the same frames with more or less video after them.
Mean +- std over worlds; `x 1x` is the mean over s of a row divided by that of direct at 1x; `- direct` is the
paired difference of the mean over s against direct at the same length on the same worlds and noise (mean +-
standard error over worlds; in brackets the worlds where the method's loss is lower).

Methods act through their install (FreeLOC variants, RIFLEx) and their prediction function (sliding
window and FreeNoise window fusion); FreeNoise's noise rescheduling only changes sampling and has no
part here.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from freeloc_dist.config import REPO_ROOT, load_render_config  # noqa: E402
from freeloc_dist.families.wan import toy as tm  # noqa: E402
from freeloc_dist.families.wan.toy_train import EVAL_SEED_BASE, keyframe_latents, noised  # noqa: E402
from freeloc_dist.methods import METHODS, get_method  # noqa: E402
from freeloc_dist.models import load_components  # noqa: E402
from freeloc_dist.profile import load_profile  # noqa: E402
from freeloc_dist.sampling import encode_prompt  # noqa: E402
from freeloc_dist.testbed import world as tw  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs/tiny.yaml")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the config's)")
    p.add_argument("--profile", type=Path, default=None, help="FreeLOC profile (default: the config's)")
    p.add_argument("--pairs", type=int, default=8, help="held-out worlds")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 12], help="multiples of T")
    p.add_argument("--frames", type=int, nargs="+", default=[], help="more lengths, in video frames (4k+1)")
    p.add_argument("--noise", type=float, nargs="+", default=[0.5, 0.8, 0.9, 0.97], help="noise levels s")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "freenoise"], choices=METHODS)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--against", default="direct", choices=METHODS,
                   help="the method of the paired-difference column (default direct)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    cfg = load_render_config(a.config)
    profile = a.profile or cfg.profile
    trained = load_profile(profile).trained_frames
    parts = load_components(a.model or cfg.model.path, cfg.model.dtype)
    transformer = parts.transformer.eval()
    bad = [f for f in a.frames if f < 1 or (f - 1) % 4]
    if bad:
        print(f"error: --frames {bad[0]} must be 4k+1 (the VAE's temporal factor is 4)", file=sys.stderr)
        return 2
    latents = sorted({k * trained for k in a.lengths} | {(f - 1) // 4 + 1 for f in a.frames})
    longest = latents[-1]
    frames_longest = 4 * (longest - 1) + 1
    worlds = [tw.sample_world(EVAL_SEED_BASE + i) for i in range(a.pairs)]
    with torch.no_grad():
        x0_all = [keyframe_latents(parts.vae.config, tw.render(w, frames_longest, tm.VIDEO_SIZE, 4)[None],
                                   frames_longest) for w in worlds]  # [1, C, F_max, H, W] each
        conds = [encode_prompt(parts, w.prompt, tm.MAX_TEXT_TOKENS)[0][None]
                 for w in worlds]
    noises = [[torch.randn(x.shape, generator=torch.Generator().manual_seed(1000 * i + j))
               for j in range(len(a.noise))] for i, x in enumerate(x0_all)]

    start = time.perf_counter()
    results: dict[tuple[int, str], np.ndarray] = {}  # (F, method) -> [pairs, levels, 2] (all frames, first T)
    cpu: dict[tuple[int, str], float] = {}  # (F, method) -> CPU seconds of this process per forward
    for f in latents:
        for name in a.methods:
            method = get_method(name, trained_frames=trained, profile=profile, backend=cfg.attention_backend)
            undo = method.install(transformer, f)
            out = np.zeros((a.pairs, len(a.noise), 2))
            cpu_start = time.process_time()
            try:
                for i in range(a.pairs):
                    x0 = x0_all[i][:, :, :f]
                    for j, s in enumerate(a.noise):
                        xs, target = noised(x0, torch.tensor([s]), noises[i][j][:, :, :f])
                        with torch.no_grad():
                            pred = method.predict(transformer, xs, torch.tensor([s * 1000.0]), conds[i], None, 1.0)
                        err = ((pred - target) ** 2).mean(dim=(0, 1, 3, 4))  # [F]
                        out[i, j] = err.mean().item(), err[:trained].mean().item()
            finally:
                undo()
            results[(f, name)] = out
            cpu[(f, name)] = (time.process_time() - cpu_start) / (a.pairs * len(a.noise))
            label = length_label(f, trained)
            print(f"[{time.perf_counter() - start:5.0f}s] {label} {name:15s} mean loss {out[..., 0].mean():.4f}",
                  file=sys.stderr, flush=True)
    print(table(results, a.noise, trained, a.pairs, a.against, cpu))
    return 0


def length_label(latent_frames: int, trained: int) -> str:
    r = latent_frames / trained
    return f"{r:.0f}x" if latent_frames % trained == 0 else f"{r:.1f}x"


def table(results: dict, levels: list[float], trained: int, pairs: int, against: str = "direct",
          cpu: dict | None = None) -> str:
    """`- {against}`: paired difference against that method; `CPU s`: CPU seconds per forward (one process, the
    --threads given; sliding windows count all their window forwards as one)."""
    cpu = cpu or {}
    ref_key = min(f for f, _ in results), "direct"
    ref = results[ref_key][..., 0].mean() if ref_key in results else None
    lines = [f"Flow-matching loss on held-out worlds, T = {trained} latent frames, mean +- std over {pairs} worlds "
             "(lower is better).", "",
             "| length | method | " + " | ".join(f"s={s:g}" for s in levels)
             + f" | mean | first T | x 1x | - {against} | CPU s |",
             "|---|---|" + "---|" * (len(levels) + 5)]
    for (f, name), out in results.items():
        cells = [f"{out[:, j, 0].mean():.3f} +- {out[:, j, 0].std():.3f}" for j in range(len(levels))]
        per_world = out[..., 0].mean(1)
        first = out[..., 1].mean(1)
        ratio = f"{per_world.mean() / ref:.2f}" if ref else "-"
        cpu_cell = f"{cpu[(f, name)]:.2f}" if (f, name) in cpu else "-"
        paired = "-"
        if name != against and (f, against) in results:
            d = per_world - results[(f, against)][..., 0].mean(1)
            paired = f"{d.mean():+.3f} +- {d.std(ddof=1) / np.sqrt(len(d)):.3f} ({int((d < 0).sum())}/{len(d)})"
        lines.append(f"| {length_label(f, trained)} | {name} | " + " | ".join(cells)
                     + f" | {per_world.mean():.3f} +- {per_world.std():.3f} | {first.mean():.3f} +- {first.std():.3f}"
                     + f" | {ratio} | {paired} | {cpu_cell} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
