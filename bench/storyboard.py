"""Does a two-segment storyboard switch at its scheduled second? Measured on the testbed's toy Wan.

    python bench/storyboard.py --steps 10 --threads 1 --plain-pairs 1 --json bench/results/storyboard_12x.json \\
        --cache outputs/sbcache --strip assets/storyboard_strip_12x.png

For each held-out world (seeds from EVAL_SEED_BASE, as bench/quality.py) the storyboard is: from 0 s, its first
object alone ("a red circle"); from --at seconds (default the middle of the video), one object of another colour
and the other shape ("a yellow square"), with the default transition (--transition, 1 s centred on --at). It
renders at --length x T (12x: 621 frames, 38.8 s) with --method (default freeloc: the config's FreeLOC profile
installed, as launch/generate.py renders; `direct` is stock attention over all frames), and the same world and seed
with each prompt alone (`plain`: the first, `plain_second`: the second; what the detector sees without a switch,
and whether the toy draws each object at this length at all; --plain-pairs N: for the first N pairs only).
Per video frame the testbed's detector (freeloc_dist.testbed.metrics.analyse: blobs of each palette colour of at
least a quarter of an object's area) says whether each of the two colours is present.
Reported per pair and as mean +- std over pairs:
  A_before, B_before: share of frames before the window (t < at - transition / 2) showing colour A, colour B;
  A_after, B_after:   the same after the window (t > at + transition / 2);
  switch_s:           the detected switch: the split second that best separates "A and not B" before it from
                      "B and not A" after it (frames that show both or neither count against every split);
  in_window:          whether switch_s lies inside [at - transition / 2, at + transition / 2].
The detector sees colour only (not shape), so the second object's shape is shown in the strip, not scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strip import write_strip  # noqa: E402

SHAPES = ("circle", "square")
COLUMNS_AROUND = 6  # strip frames: 3 before the window, 3 after, plus the first and last frame


def segments_of(world) -> tuple[tuple[str, str], tuple[str, str]]:
    """(colour, shape) of the first segment (the world's first object) and of the second (another colour, the
    other shape): the colour three palette steps on, so it is never the first's."""
    first = world.objects[0]
    colour = tw.COLOURS[(tw.COLOURS.index(first.colour) + 3) % len(tw.COLOURS)]
    shape = SHAPES[1 - SHAPES.index(first.shape)]
    return (first.colour, first.shape), (colour, shape)


def detect(video: np.ndarray, colours: list[str], fps: int, at: float, transition: float) -> dict:
    """The per-frame presence of the two colours, scored around the scheduled switch."""
    present = tm.analyse(video, colours)["count"] > 0  # [V, 2]
    a, b = present[:, 0], present[:, 1]
    t = np.arange(len(video)) / fps
    before, after = t < at - transition / 2, t > at + transition / 2
    only_a, only_b = a & ~b, b & ~a
    # score of splitting before frame s: frames before s that show only A + frames from s on that show only B
    score = np.concatenate([[0], np.cumsum(only_a)]) + np.concatenate([np.cumsum(only_b[::-1])[::-1], [0]])
    s = int(np.argmax(score))
    switch = s / fps
    return dict(A_before=float(a[before].mean()), B_before=float(b[before].mean()),
                A_after=float(a[after].mean()), B_after=float(b[after].mean()), switch_s=switch,
                in_window=bool(abs(switch - at) <= transition / 2), per_frame=present.astype(int).tolist())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs/tiny.yaml")
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--length", type=int, default=12, help="multiple of the trained length T (12: 621 frames)")
    p.add_argument("--at", type=float, default=None, help="second of the switch (default: the middle)")
    p.add_argument("--transition", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--method", choices=METHODS, default="freeloc",
                   help="long-video method of every render (default freeloc: the config's profile)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plain-pairs", type=int, default=None,
                   help="render the one-prompt controls for the first N pairs only (default: every pair)")
    p.add_argument("--json", type=Path, default=REPO_ROOT / "outputs/storyboard.json")
    p.add_argument("--cache", type=Path, default=None, help="keep rendered videos here (.npy) and reuse them")
    p.add_argument("--strip", type=Path, default=None,
                   help="PNG strip: every pair's storyboard render, then the one-prompt controls")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    base = load_render_config(a.config)
    trained = load_profile(base.profile).trained_frames
    frames = 4 * (a.length * trained - 1) + 1
    fps = base.video.fps
    at = a.at if a.at is not None else round(frames / fps / 2, 1)
    parts = load_components(base.model.path, base.model.dtype)
    method = get_method(a.method, trained_frames=trained, profile=base.profile, backend=base.attention_backend)
    rows, strip_rows, start = [], [], time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="storyboard-"))
    for i in range(a.pairs):
        world = tw.sample_world(EVAL_SEED_BASE + i)
        (ca, sa), (cb, sb) = segments_of(world)
        board = folder / f"pair{i}.yaml"
        board.write_text(f"- {{at: 0, prompt: a {ca} {sa}}}\n"
                         f"- {{at: {at}, prompt: a {cb} {sb}, transition: {a.transition}}}\n")
        runs = {"storyboard": {"storyboard": str(board)}}
        if a.plain_pairs is None or i < a.plain_pairs:
            runs["plain"] = {"prompt": f"a {ca} {sa}"}
            runs["plain_second"] = {"prompt": f"a {cb} {sb}"}
        for name, over in runs.items():
            cfg = load_render_config(a.config, {**over, "video.frames": frames, "sampling.seed": i,
                                                "sampling.steps": a.steps})
            key = f"{frames}f_{a.method}_{name}_{i}_{a.steps}steps_at{at}_tr{a.transition}.npy"
            cached = a.cache / key if a.cache is not None else None
            if cached is not None and cached.exists():
                video = np.load(cached)
            else:
                video = method.render(parts, cfg, (frames - 1) // 4 + 1).frames
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    np.save(cached, video)
            m = detect(video, [ca, cb], fps, at, a.transition)
            rows.append(dict(pair=i, run=name, method=a.method, first=f"a {ca} {sa}", second=f"a {cb} {sb}", at=at,
                             transition=a.transition, frames=frames, **m))
            print(f"[{time.perf_counter() - start:6.0f}s] pair {i} {name:10s} {ca} {sa} -> {cb} {sb}: "
                  + " ".join(f"{k}={m[k]:.3f}" for k in ("A_before", "B_before", "A_after", "B_after", "switch_s"))
                  + f" in_window={m['in_window']}", flush=True)
            if a.strip is not None:
                label = (f"pair {i}: {ca} {sa}\n-> {cb} {sb}\nswitch {m['switch_s']:.1f} s" if name == "storyboard"
                         else f"pair {i} {name}:\n{over['prompt'][2:]}")
                strip_rows.append((name != "storyboard", i, label, video, [ca, cb]))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(rows) + "\n")
    print()
    print(f"method {a.method}")
    print(table(rows, at, a.transition, frames, fps))
    if strip_rows:
        w = a.transition / 2
        around = [at - w - 2, at - w - 1, at - w, at + w, at + w + 1, at + w + 2]
        times = [0, *[min(frames - 1, max(0, int(round(s * fps)))) for s in around], frames - 1]
        strip_rows.sort(key=lambda r: r[:2])  # storyboards by pair, then the controls
        write_strip(a.strip, [r[2:4] for r in strip_rows], [r[4] for r in strip_rows], fps,
                    times=np.array(times), motion=False)
        print(f"wrote {a.strip}")
    return 0


def table(rows: list[dict], at: float, transition: float, frames: int, fps: int) -> str:
    lines = [f"{frames} frames ({frames / fps:.1f} s), switch at {at:g} s, transition {transition:g} s; "
             f"mean +- std over {len({r['pair'] for r in rows})} pairs",
             "| run | A_before | B_before | A_after | B_after | switch_s | in window |",
             "|---|---|---|---|---|---|---|"]
    for run in dict.fromkeys(r["run"] for r in rows):
        sel = [r for r in rows if r["run"] == run]

        def cell(key, sel=sel):
            v = np.array([r[key] for r in sel], dtype=float)
            return f"{v.mean():.3f} +- {v.std():.3f}"
        inside = sum(r["in_window"] for r in sel)
        lines.append(f"| {run} | {cell('A_before')} | {cell('B_before')} | {cell('A_after')} | {cell('B_after')} "
                     f"| {cell('switch_s')} | {inside}/{len(sel)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
