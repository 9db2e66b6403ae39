"""A PNG strip of testbed videos: frames over time, one row per method, same world and seed.

    python bench/strip.py --cache outputs/qcache --frames 621 --pair 0 --out assets/testbed_strip_12x.png

Reads the videos that `bench/quality.py --cache DIR` rendered (and renders nothing): the ground truth of the
held-out world `--pair` and every method found in the cache at that length, pair and step count. Each row is
COLUMNS frames evenly spaced over the video, then a track panel: the world's background with the path of every
prompted object's smoothed tracked centre over the whole video (freeloc_dist.testbed.metrics.smooth_track),
in the object's colour, so a person can see at a glance whether the objects travel and cover the frame. The
row label gives the motion metrics of that video (travel: % of the side per second; coverage of the
reachable square).

Shapes (legend): T frames, P pixels per side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from freeloc_dist.families.wan.toy_train import EVAL_SEED_BASE  # noqa: E402
from freeloc_dist.methods import METHODS  # noqa: E402
from freeloc_dist.testbed import metrics as tm  # noqa: E402
from freeloc_dist.testbed import world as tw  # noqa: E402

COLUMNS = 8
SCALE = 2  # 64 px frames drawn at 128 px
LABEL_WIDTH = 150
GAP = 4


def track_panel(video: np.ndarray, colours: list[str], size: int) -> Image.Image:
    """The video's median frame (its background, objects mostly removed) with the smoothed tracks drawn."""
    bg = np.median(video[:: max(1, len(video) // 64)], axis=0).astype(np.uint8)  # [P, P, 3]
    img = Image.fromarray(bg).resize((size, size), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    tracks = tm.analyse(video, colours)["tracks"]
    for name, c in tracks.items():
        s = tm.smooth_track(c) * size  # (y, x) in panel pixels
        colour = tuple(int(255 * v) for v in tw.PALETTE[name])
        run: list[tuple[float, float]] = []
        for p in list(s) + [np.array([np.nan, np.nan])]:  # a gap in the track breaks the line
            if np.isnan(p).any():
                if len(run) > 1:
                    draw.line(run, fill=colour, width=2)
                run = []
            else:
                run.append((float(p[1]), float(p[0])))
    return img


def write_strip(path: Path, rows: list[tuple[str, np.ndarray]], colours: list[str] | list[list[str]], fps: int = 16,
                times: np.ndarray | None = None, motion: bool = True) -> None:
    """rows: (label, uint8 video [T, P, P, 3]) pairs, drawn top to bottom; `colours`: the prompted colours of
    every row, or one list per row; `times`: the frames shown (default COLUMNS evenly spaced); `motion`: add the
    motion metrics to each label."""
    per_row = colours if colours and isinstance(colours[0], list) else [colours] * len(rows)
    p = rows[0][1].shape[1]
    cell = p * SCALE
    header = 16
    t = rows[0][1].shape[0]
    times = np.linspace(0, t - 1, COLUMNS).round().astype(int) if times is None else np.asarray(times)
    columns = len(times)
    width = LABEL_WIDTH + (columns + 1) * (cell + GAP)
    img = Image.new("RGB", (width, header + len(rows) * (cell + GAP)), "white")
    draw = ImageDraw.Draw(img)
    for j, f in enumerate(times):
        draw.text((LABEL_WIDTH + j * (cell + GAP), 2), f"t = {f / fps:.1f} s", fill="black")
    draw.text((LABEL_WIDTH + columns * (cell + GAP), 2), "tracks, whole video", fill="black")
    for i, ((label, video), colours) in enumerate(zip(rows, per_row)):
        y = header + i * (cell + GAP)
        text = label
        if motion:
            m = tm.motion(tm.analyse(video, colours)["tracks"])
            text += f"\ntravel {m['travel']:.1f} %/s\nmoving {m['moving']:.2f}\ncoverage {m['coverage']:.2f}"
        draw.multiline_text((4, y + 4), text, fill="black", spacing=3)
        for j, f in enumerate(times):
            img.paste(Image.fromarray(video[f]).resize((cell, cell), Image.NEAREST),
                      (LABEL_WIDTH + j * (cell + GAP), y))
        img.paste(track_panel(video, colours, cell), (LABEL_WIDTH + columns * (cell + GAP), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)


def cached_rows(cache: Path, frames: int, pair: int, steps: int, size: int = 64) -> tuple[list, list[str]]:
    """Ground truth plus every method cached by bench/quality.py for this length, pair and step count."""
    w = tw.sample_world(EVAL_SEED_BASE + pair)
    rows = [("ground truth", tw.render(w, frames, size))]
    for name in METHODS:
        f = cache / f"{frames}f_{name}_{pair}_{steps}steps.npy"
        if f.exists():
            rows.append((name, np.load(f)))
    return rows, tm.colours_of_prompt(w.prompt)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, required=True, help="bench/quality.py --cache directory")
    p.add_argument("--frames", type=int, default=621, help="video frames (621 = 12x)")
    p.add_argument("--pair", type=int, default=0, help="held-out world")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    rows, colours = cached_rows(a.cache, a.frames, a.pair, a.steps)
    if len(rows) == 1:
        print(f"error: no cached video of {a.frames} frames, pair {a.pair}, {a.steps} steps in {a.cache}",
              file=sys.stderr)
        return 2
    write_strip(a.out, rows, colours)
    print(f"{a.out}: {', '.join(r[0] for r in rows)}; prompt of pair {a.pair}: {' and '.join(colours)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
