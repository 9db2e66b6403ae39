"""Weight-free video quality metrics of the testbed, measured against what the world guarantees.

A video of the world is a static low-saturation background plus the prompted saturated objects, each
exactly once, moving smoothly at constant speed between bounces. Each metric checks one of these facts per
frame and averages over the video (all scores but `dynamic` are in [0, 1], higher is better):

- `subject` (subject consistency: identity and count): per frame, the fraction of prompted objects found
  exactly once (one blob of their colour of about the right area), minus the fraction of blobs of colours
  that were not prompted; clipped to [0, 1].
- `background` (background consistency): 1 - mean |frame - temporal median| over background pixels
  (away from any saturated pixel), divided by BG_TOLERANCE and clipped.
- `imaging` (imaging quality / sharpness): of all pixels that are not clean background (low saturation),
  the fraction that are clean object colour; blur, smears and noise produce in-between colours (the
  world's own antialiased edges make this about 0.8, not 1).
- `smoothness` (motion smoothness): 1 - mean(min(|acceleration|, ACCEL_SCALE) / ACCEL_SCALE) of every tracked
  object's centre over consecutive found frames (bounces of the real world cost little); 0 with no track.
- `dynamic` (dynamic degree, frame to frame): mean displacement of tracked centres per frame, in % of the
  frame side. A blob whose shape wobbles moves its centre every frame, so an object that stays in one spot
  scores as moving here; the next three metrics measure motion over seconds instead.
- `travel`: mean net displacement over one second (TRAVEL_WINDOW = 16 frames at 16 fps) of each tracked
  centre, smoothed over SMOOTH_WINDOW frames so that shape wobble does not count, in % of the frame side per
  second. The world's objects move 19-56 % of the side per second along their path (SPEED_RANGE); a bounce
  inside the window shortens the net displacement, so its ground truth is lower (about 25-45).
- `moving`: fraction of (object, one-second window) pairs whose smoothed centre travels at least
  MIN_TRAVEL, half the path of the world's slowest object in a second: what a person reads as "it moves".
  The ground truth is near 1 (lower only where a head-on bounce falls inside the window); an object that
  jitters or paces back and forth in one spot scores 0.
- `coverage`: fraction of the COVERAGE_CELLS x COVERAGE_CELLS cells of the square the world's centres can
  reach that the smoothed track passes through over the whole video, averaged over the prompted objects;
  it grows with length as the world's objects sweep the frame, so compare it with the ground truth at the
  same length (see `coverage_ratio`).
- with a `reference` (the ground truth video of the same world and length): `travel_gap`, the 1-Wasserstein
  distance between the video's and the reference's distributions of one-second displacements (% of side
  per second; 0 = motion as in the world, the reference's mean travel = no motion at all), and
  `coverage_ratio`, coverage / the reference's coverage.
- `missing` and `duplicated`: fraction of (frame, prompted object) pairs with no blob of that colour, and
  with more than one (the duplicated-object artifact); `subject` counts both as not found.
- `freeze_loop`: fraction of frames inside a frozen run or inside a window that repeats an earlier window
  at a lag of at least LOOP_MIN_LAG frames (lower is better); a static or looping video cannot hide here.
- `overall`: mean of subject, background, imaging, smoothness and moving, times (1 - freeze_loop).

Shapes (legend): V video frames, P pixels per side, K prompted objects, N palette colours.
"""

from __future__ import annotations

import numpy as np
import torch

from freeloc_dist.testbed import world as tw

SATURATION_OBJECT = 0.35  # max - min of RGB in [0, 1]; the background stays below 0.15
SATURATION_BACKGROUND = 0.15
COLOUR_TOLERANCE = 0.25  # RGB distance to a palette colour for a clean object pixel
MATCH_TOLERANCE = 0.45  # RGB distance for a pixel to count towards a colour's blob
BG_TOLERANCE = 0.1
ACCEL_SCALE = 0.1  # frame sides per frame^2
LOOP_MIN_LAG = 8
LOOP_WINDOW = 8
LOOP_TOLERANCE = 0.01
FREEZE_TOLERANCE = 1e-3
TRAVEL_WINDOW = 16  # frames: one second at the renderer's 16 fps
SMOOTH_WINDOW = 5  # frames of the centred moving average applied to a track before measuring travel
MIN_TRAVEL = 0.5 * tw.SPEED_RANGE[0] * TRAVEL_WINDOW  # frame sides: half the slowest object's 1-s path
COVERAGE_CELLS = 8  # per side of the square [r, 1 - r]^2 that object centres can reach

METRICS = ("subject", "missing", "duplicated", "background", "imaging", "smoothness", "dynamic", "travel",
           "moving", "coverage", "freeze_loop", "overall")
REFERENCE_METRICS = ("travel_gap", "coverage_ratio")


def _expected_area(size: int) -> float:
    return float(np.pi * (tw.RADIUS_FRACTION * size) ** 2)


def _label(mask: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbour) of masks [V, P, P]: int64 labels, 0 = outside."""
    t, p, _ = mask.shape
    assert t * p * p < 2**24, "ids must be exact in float32"
    ids = torch.arange(1, t * p * p + 1, dtype=torch.float32).view(t, 1, p, p)
    m = mask.view(t, 1, p, p)
    zero = torch.zeros(())
    lab = torch.where(m, ids, zero)
    while True:  # propagate the largest id through each component
        new = torch.where(m, torch.nn.functional.max_pool2d(lab, 3, stride=1, padding=1), zero)
        if torch.equal(new, lab):
            return lab.view(t, p, p).long()
        lab = new


def _blobs(mask: np.ndarray, min_area: float) -> list[list[tuple[float, float, float]]]:
    """Per frame, the blobs of masks [V, P, P] with at least min_area pixels: (area, cy, cx)."""
    t, p, _ = mask.shape
    out: list[list[tuple[float, float, float]]] = [[] for _ in range(t)]
    if not mask.any():
        return out
    lab = _label(torch.from_numpy(mask)).numpy().ravel()  # ids are unique across frames
    yy, xx = np.mgrid[0:p, 0:p]
    ys, xs = np.tile(yy.ravel(), t), np.tile(xx.ravel(), t)
    n = t * p * p + 1
    count = np.bincount(lab, minlength=n)
    sy = np.bincount(lab, weights=ys, minlength=n)
    sx = np.bincount(lab, weights=xs, minlength=n)
    for i in np.nonzero(count >= min_area)[0]:
        if i == 0:
            continue
        c = count[i]
        out[(i - 1) // (p * p)].append((float(c), (sy[i] / c + 0.5) / p, (sx[i] / c + 0.5) / p))
    return out


def analyse(video: np.ndarray, colours: list[str]) -> dict:
    """Per-frame detections of video uint8 [V, P, P, 3] for the prompted colours."""
    x = video.astype(np.float32) / 255.0
    t, p = x.shape[0], x.shape[1]
    sat = x.max(-1) - x.min(-1)  # [V, P, P]
    palette = np.array([tw.PALETTE[c] for c in tw.COLOURS], dtype=np.float32)  # [N, 3]
    dist = np.linalg.norm(x[..., None, :] - palette, axis=-1)  # [V, P, P, N]
    nearest = dist.argmin(-1)
    near_d = dist.min(-1)
    area = _expected_area(p)
    tracks = {}
    found = np.zeros((t, len(colours)), dtype=bool)
    count = np.zeros((t, len(colours)), dtype=np.int64)  # blobs of each prompted colour per frame
    extras = np.zeros(t)
    for ci, name in enumerate(tw.COLOURS):
        mask = (nearest == ci) & (near_d < MATCH_TOLERANCE) & (sat > SATURATION_OBJECT)  # [V, P, P]
        blobs = _blobs(mask, 0.25 * area)
        if name in colours:
            k = colours.index(name)
            centre = np.full((t, 2), np.nan)
            for f, b in enumerate(blobs):
                count[f, k] = len(b)
                if len(b) == 1 and 0.4 * area <= b[0][0] <= 2.0 * area:
                    found[f, k] = True
                    centre[f] = b[0][1:]
            tracks[name] = centre
        else:
            extras += np.array([len(b) for b in blobs])
    return dict(found=found, count=count, extras=extras, tracks=tracks, saturation=sat, near_distance=near_d)


def _subject(a: dict, k: int) -> float:
    per_frame = a["found"].sum(1) / k - a["extras"] / k  # [V]
    return float(np.clip(per_frame, 0, 1).mean())


def _background(video: np.ndarray, sat: np.ndarray) -> float:
    x = video.astype(np.float32) / 255.0
    obj = torch.from_numpy(sat > SATURATION_BACKGROUND).float()[:, None]  # [V, 1, P, P]
    obj = torch.nn.functional.max_pool2d(obj, 5, stride=1, padding=2)[:, 0].numpy() > 0  # dilate 2 px
    bg = np.where(obj[..., None], np.nan, x)  # [V, P, P, 3]
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(bg, axis=0)  # [P, P, 3]
            err = np.nanmean(np.abs(bg - median), axis=(1, 2, 3))  # [V]
    err = np.where(np.isnan(err), 1.0, err)  # a frame with no background at all scores 0
    return float(np.clip(1 - err / BG_TOLERANCE, 0, 1).mean())


def _imaging(sat: np.ndarray, near_d: np.ndarray) -> float:
    clean_object = (near_d < COLOUR_TOLERANCE) & (sat > SATURATION_OBJECT)
    between = ~clean_object & (sat >= SATURATION_BACKGROUND)  # neither clean background nor clean object
    n_obj, n_between = int(clean_object.sum()), int(between.sum())
    return n_obj / (n_obj + n_between) if n_obj + n_between else 1.0


def _smoothness_dynamic(tracks: dict) -> tuple[float, float]:
    accels, steps = [], []
    for c in tracks.values():  # [V, 2], NaN where not found
        v = c[1:] - c[:-1]
        a = v[1:] - v[:-1]
        steps.extend(np.linalg.norm(v[~np.isnan(v).any(1)], axis=1))
        accels.extend(np.linalg.norm(a[~np.isnan(a).any(1)], axis=1))
    smooth = 1 - float(np.mean(np.minimum(accels, ACCEL_SCALE) / ACCEL_SCALE)) if accels else 0.0
    dynamic = 100 * float(np.mean(steps)) if steps else 0.0
    return smooth, dynamic


def smooth_track(c: np.ndarray) -> np.ndarray:
    """Centred moving average [V, 2] of a track over SMOOTH_WINDOW frames, over the found frames in reach;
    NaN where the object was not found, so a gap is never bridged."""
    h = SMOOTH_WINDOW // 2
    valid = ~np.isnan(c).any(1)
    v = np.where(valid[:, None], c, 0.0)
    kernel = np.ones(2 * h + 1)
    num = np.stack([np.convolve(v[:, a], kernel, mode="same") for a in range(2)], 1)
    den = np.convolve(valid.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den[:, None]
    out[~valid] = np.nan
    return out


def one_second_displacements(tracks: dict) -> np.ndarray:
    """Net displacements (frame sides) over TRAVEL_WINDOW frames of every smoothed track, pooled: [N]."""
    out = []
    for c in tracks.values():
        s = smooth_track(c)
        d = np.linalg.norm(s[TRAVEL_WINDOW:] - s[:-TRAVEL_WINDOW], axis=1) if len(s) > TRAVEL_WINDOW else []
        out.extend(x for x in d if not np.isnan(x))
    return np.array(out, dtype=np.float64)


def _coverage_one(c: np.ndarray) -> float:
    """Fraction of coverage cells holding the smoothed centre [V, 2] in some frame. A cell is 0.09 of the
    side, 2.6 frames of the world's fastest object, so consecutive centres of a world-like track never skip
    one."""
    r = tw.RADIUS_FRACTION
    n = COVERAGE_CELLS
    s = smooth_track(c)
    pts = s[~np.isnan(s).any(1)]
    if not len(pts):
        return 0.0
    cells = np.clip(((pts - r) / (1 - 2 * r) * n).astype(int), 0, n - 1)
    return len({(int(y), int(x)) for y, x in cells}) / (n * n)


def motion(tracks: dict) -> dict[str, float]:
    """travel (% of side per second), moving and coverage of the prompted objects' tracks."""
    d = one_second_displacements(tracks)
    return dict(
        travel=100 * float(d.mean()) if len(d) else 0.0,
        moving=float((d >= MIN_TRAVEL).mean()) if len(d) else 0.0,
        coverage=float(np.mean([_coverage_one(c) for c in tracks.values()])) if tracks else 0.0,
    )


def reference_motion(tracks: dict, ref_tracks: dict) -> dict[str, float]:
    """travel_gap and coverage_ratio of tracks against the ground truth's tracks (same world and length)."""
    d, ref = one_second_displacements(tracks), one_second_displacements(ref_tracks)
    if not len(d):
        d = np.zeros(1)  # nothing trackable moves: as far from the world as a frozen video
    q = np.linspace(0, 1, 101)  # W1 in one dimension = the mean gap between the quantile functions
    gap = float(np.abs(np.quantile(d, q) - np.quantile(ref, q)).mean()) if len(ref) else 0.0
    cov = np.mean([_coverage_one(c) for c in tracks.values()]) if tracks else 0.0
    ref_cov = np.mean([_coverage_one(c) for c in ref_tracks.values()])
    return dict(travel_gap=100 * gap, coverage_ratio=float(cov / ref_cov) if ref_cov else 0.0)


def _freeze_loop(video: np.ndarray) -> float:
    """Fraction of frames in a frozen run or in a repeat of an earlier window (lag >= LOOP_MIN_LAG)."""
    x = torch.from_numpy(video).float().div(255).permute(0, 3, 1, 2)  # [V, 3, P, P]
    x = torch.nn.functional.avg_pool2d(x, 4).flatten(1)  # [V, 3 P^2 / 16]
    t = x.shape[0]
    flagged = np.zeros(t, dtype=bool)
    d = (x[1:] - x[:-1]).abs().mean(1).numpy()  # [V-1]
    frozen = d < FREEZE_TOLERANCE
    for i in range(len(d)):  # a frozen run needs at least two still steps in a row
        if frozen[i] and ((i > 0 and frozen[i - 1]) or (i + 1 < len(d) and frozen[i + 1])):
            flagged[i] = flagged[i + 1] = True
    w = LOOP_WINDOW
    if t >= LOOP_MIN_LAG + w:
        dist = torch.cdist(x, x, p=1).numpy() / x.shape[1]  # [V, V] mean abs difference
        for lag in range(LOOP_MIN_LAG, t - w + 1):
            diag = np.diagonal(dist, offset=lag)  # dist[s, s + lag], s in [0, V - lag)
            win = np.convolve(diag, np.ones(w) / w, mode="valid")  # windows of w consecutive pairs
            for s in np.nonzero(win < LOOP_TOLERANCE)[0]:
                flagged[s + lag: s + lag + w] = True
    return float(flagged.mean())


def video_metrics(video: np.ndarray, colours: list[str], reference: np.ndarray | None = None,
                  reference_tracks: dict | None = None) -> dict[str, float]:
    """All metrics of one video uint8 [V, P, P, 3] whose prompt names objects of `colours`; with `reference`
    (the ground truth video of the same world and length), or its `analyse(...)["tracks"]` as
    `reference_tracks` (analysing a long video takes a while, so a bench that scores many videos against the
    same ground truth passes it once analysed), also REFERENCE_METRICS."""
    a = analyse(video, colours)
    smooth, dynamic = _smoothness_dynamic(a["tracks"])
    m = dict(
        subject=_subject(a, len(colours)),
        missing=float((a["count"] == 0).mean()),
        duplicated=float((a["count"] > 1).mean()),
        background=_background(video, a["saturation"]),
        imaging=_imaging(a["saturation"], a["near_distance"]),
        smoothness=smooth,
        dynamic=dynamic,
        **motion(a["tracks"]),
        freeze_loop=_freeze_loop(video),
    )
    parts = [m["subject"], m["background"], m["imaging"], m["smoothness"], m["moving"]]
    m["overall"] = float(np.mean(parts)) * (1 - m["freeze_loop"])
    if reference is not None and reference_tracks is None:
        reference_tracks = analyse(reference, colours)["tracks"]
    if reference_tracks is not None:
        m.update(reference_motion(a["tracks"], reference_tracks))
    return m


def colours_of_prompt(prompt: str) -> list[str]:
    """The object colours a world prompt names, in order ("a red circle and a blue square" -> [red, blue])."""
    return [w for w in prompt.replace(",", " ").split() if w in tw.PALETTE]
