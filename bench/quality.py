"""Quality table of the miniature long-video testbed: methods x lengths x weight-free metrics.

    python bench/quality.py                       # 8 prompt-seed pairs, all methods, 1x / 4x / 12x
    python bench/quality.py --pairs 2 --lengths 4 --methods direct freeloc   # a quick look
    python bench/quality.py --frames 961          # also the one-minute length (961 frames, 241 latent frames)

Renders each held-out world's prompt (world seeds from EVAL_SEED_BASE, never seen in training) with every
method through the production loader and sampling loop, scores every video with
freeloc_dist.testbed.metrics, and prints a markdown table of mean +- standard deviation over the pairs
(a `ground truth` row scores the world's own render at the same length). Raw per-video numbers go to
--json. Lengths are multiples of the model's trained latent frames T: F = k T latent frames (--lengths),
or video frame counts 4k+1 (--frames). With --cache DIR every rendered video is kept there as .npy and read
back on a later run with the same arguments instead of rendering again; a render depends only on its world,
seed, method, length and step count, so a cached run prints the same numbers as a fresh one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from freeloc_dist.config import REPO_ROOT, load_render_config  # noqa: E402
from freeloc_dist.families.wan.toy_train import EVAL_SEED_BASE  # noqa: E402
from freeloc_dist.methods import METHODS, get_method  # noqa: E402
from freeloc_dist.models import load_components  # noqa: E402
from freeloc_dist.profile import load_profile  # noqa: E402
from freeloc_dist.testbed import metrics as tm  # noqa: E402
from freeloc_dist.testbed import world as tw  # noqa: E402
from freeloc_dist.video import write_mp4  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strip import write_strip  # noqa: E402

SHOWN = ("subject", "missing", "duplicated", "background", "imaging", "smoothness", "freeze_loop", "overall")
MOTION = ("dynamic", "travel", "moving", "coverage", "travel_gap", "coverage_ratio")
PAIRED = ("travel", "moving", "coverage", "travel_gap", "duplicated", "subject", "overall")
LOWER_IS_BETTER = ("missing", "duplicated", "freeze_loop", "travel_gap")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs/tiny.yaml")
    p.add_argument("--pairs", type=int, default=8, help="prompt-seed pairs (held-out worlds)")
    p.add_argument("--first-pair", type=int, default=0, help="run pairs [first, pairs) only (to split a run)")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="print the table of these --json files (from split runs) and exit")
    p.add_argument("--lengths", type=int, nargs="+", default=[1, 4, 12], help="multiples of T")
    p.add_argument("--frames", type=int, nargs="+", default=[], help="more lengths, in video frames (4k+1)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--steps", type=int, default=None, help="override sampling.steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=REPO_ROOT / "outputs/quality.json")
    p.add_argument("--videos", type=Path, default=None, help="also write every video here as mp4")
    p.add_argument("--cache", type=Path, default=None, help="keep rendered videos here (.npy) and reuse them")
    p.add_argument("--cached-only", action="store_true",
                   help="with --cache: score only the videos already cached, render nothing (to rescore a run)")
    p.add_argument("--against", default="direct", choices=METHODS,
                   help="the method the paired-difference table compares with (default direct)")
    p.add_argument("--strip", type=Path, default=None,
                   help="write a PNG strip (bench/strip.py) of the first pair at the longest length here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.merge:
        rows = merged_rows(json.loads(path.read_text()) for path in a.merge)
        print(table(rows, load_profile(load_render_config(a.config).profile).trained_frames,
                    len({r["pair"] for r in rows}), a.against))
        return 0

    base = load_render_config(a.config)
    if base.profile is None:
        raise SystemExit("the config names no FreeLOC profile")
    trained = load_profile(base.profile).trained_frames
    parts = load_components(base.model.path, base.model.dtype)
    worlds = {i: tw.sample_world(EVAL_SEED_BASE + i) for i in range(a.first_pair, a.pairs)}
    rows: list[dict] = []
    start = time.perf_counter()
    bad = [f for f in a.frames if f < 1 or (f - 1) % 4]
    if a.cached_only and a.cache is None:
        print("error: --cached-only needs --cache DIR", file=sys.stderr)
        return 2
    if bad:
        print(f"error: --frames {bad[0]} must be 4k+1 (the VAE's temporal factor is 4)", file=sys.stderr)
        return 2
    all_frames = sorted({4 * (k * trained - 1) + 1 for k in a.lengths} | set(a.frames))
    steps = a.steps or base.sampling.steps
    strip_rows: list[tuple[str, np.ndarray]] = []
    for frames in all_frames:
        latent = (frames - 1) // 4 + 1
        k = length_label(latent, trained)
        for i, w in worlds.items():
            colours = tm.colours_of_prompt(w.prompt)
            gt = tw.render(w, frames, base.video.height)
            gt_tracks = tm.analyse(gt, colours)["tracks"]
            rows.append(dict(method="ground truth", length=k, frames=frames, pair=i, prompt=w.prompt,
                             **tm.video_metrics(gt, colours, reference_tracks=gt_tracks)))
            keep = a.strip is not None and frames == all_frames[-1] and i == a.first_pair
            if keep:
                strip_rows.append(("ground truth", gt))
            for name in a.methods:
                method = get_method(name, trained_frames=trained, profile=base.profile,
                                    backend=base.attention_backend)
                over = {"prompt": w.prompt, "video.frames": frames, "sampling.seed": i}
                if a.steps:
                    over["sampling.steps"] = a.steps
                cfg = load_render_config(a.config, over)
                cached = a.cache / f"{frames}f_{name}_{i}_{steps}steps.npy" if a.cache else None
                if cached is not None and cached.exists():
                    video = np.load(cached)
                elif a.cached_only:
                    continue
                else:
                    video = method.render(parts, cfg, latent).frames
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        np.save(cached.with_suffix(".tmp.npy"), video)
                        cached.with_suffix(".tmp.npy").rename(cached)  # never a half-written cache entry
                m = tm.video_metrics(video, colours, reference_tracks=gt_tracks)
                if keep:
                    strip_rows.append((name, video))
                rows.append(dict(method=name, length=k, frames=frames, pair=i, prompt=w.prompt, **m))
                if a.videos is not None:
                    write_mp4(a.videos / f"{k}_{name}_{i}.mp4", video, base.video.fps)
                print(f"[{time.perf_counter() - start:6.0f}s] {k} pair {i} {name:15s} "
                      + " ".join(f"{key}={m[key]:.3f}" for key in SHOWN + MOTION), flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows, indent=1) + "\n")
    if strip_rows:
        write_strip(a.strip, strip_rows, tm.colours_of_prompt(worlds[a.first_pair].prompt), base.video.fps)
        print(f"wrote {a.strip}")
    print()
    print(table(rows, trained, len(worlds), a.against))
    return 0


def merged_rows(runs) -> list[dict]:
    """The rows of several runs' --json lists, one per (frames, method, pair): split runs of one length each
    score the ground truth again, and a video rendered twice scores the same (renders are deterministic)."""
    rows = {}
    for run in runs:
        for r in run:
            rows.setdefault((r["frames"], r["method"], r["pair"]), r)
    return sorted(rows.values(), key=lambda r: (r["frames"], r["pair"]))


def length_label(latent_frames: int, trained: int) -> str:
    """"4x" for a multiple of T, else the ratio with one decimal ("18.5x" for 241 latent frames of T = 13)."""
    r = latent_frames / trained
    return f"{r:.0f}x" if latent_frames % trained == 0 else f"{r:.1f}x"


def table(rows: list[dict], trained: int, pairs: int, against: str = "direct") -> str:
    """Markdown: mean +- std over pairs per (length, method) for the appearance and the motion metrics, then
    each method's paired differences against `against` (direct) on the same world and seed (mean +- standard
    error)."""
    keys = []
    for r in sorted(rows, key=lambda r: r["frames"]):
        if (r["length"], r["method"]) not in keys:
            keys.append((r["length"], r["method"]))

    def cell(v: np.ndarray, m: str) -> str:
        return f"{v.mean():.1f} +- {v.std():.1f}" if m in ("dynamic", "travel", "travel_gap") else \
            f"{v.mean():.3f} +- {v.std():.3f}"

    counts = ", ".join(f"{k}: {len({r['pair'] for r in rows if r['length'] == k})}"
                       for k in dict.fromkeys(k for k, _ in keys))
    out = [f"T = {trained} latent frames; mean +- std over the prompt-seed pairs ({counts}). Lower is better for "
           f"{', '.join(LOWER_IS_BETTER)}; dynamic: % of the side per frame; travel, travel_gap: % of the side "
           "per second; the others in [0, 1], higher is better."]
    for shown in (SHOWN, MOTION):
        out += ["", "| length | method | " + " | ".join(shown) + " |", "|---|---|" + "---|" * len(shown)]
        for k, name in keys:
            sel = [r for r in rows if r["length"] == k and r["method"] == name]
            out.append(f"| {k} | {name} | " + " | ".join(cell(np.array([r[m] for r in sel]), m) for m in shown) + " |")
    out += ["", f"Paired differences against {against} (method - {against} on the same world and seed; mean +- "
            "standard error over the pairs; in brackets the pairs where the method is better):", "",
            "| length | method | " + " | ".join(PAIRED) + " |", "|---|---|" + "---|" * len(PAIRED)]
    for k, name in keys:
        if name in (against, "ground truth"):
            continue
        ref = {r["pair"]: r for r in rows if r["length"] == k and r["method"] == against}
        sel = [r for r in rows if r["length"] == k and r["method"] == name and r["pair"] in ref]
        if not sel:
            continue
        cells = []
        for m in PAIRED:
            d = np.array([r[m] - ref[r["pair"]][m] for r in sel])
            se = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
            better = int((d < 0).sum() if m in LOWER_IS_BETTER else (d > 0).sum())
            f = ".1f" if m in ("travel", "travel_gap") else ".3f"
            cells.append(f"{d.mean():+{f}} +- {se:{f}} ({better}/{len(d)})")
        out.append(f"| {k} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
