"""Testbed metrics on synthetic videos with known answers: the world's own render scores well; a frozen,
a shuffled, a looped and a noise video each score badly on the metric meant to catch it."""

import numpy as np
import pytest
import torch

from freeloc_dist.testbed import metrics as M
from freeloc_dist.testbed import world as tw

pytestmark = pytest.mark.unit

FRAMES = 41


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    w = tw.sample_world(3, num_objects=2)
    video = tw.render(w, FRAMES)
    return w, video, M.colours_of_prompt(w.prompt)


def test_world_is_deterministic_and_matches_prompt():
    w = tw.sample_world(7)
    assert w == tw.sample_world(7)
    assert (tw.render(w, 9) == tw.render(w, 9)).all()
    assert M.colours_of_prompt(w.prompt) == [o.colour for o in w.objects]
    paths = tw.trajectories(w, 300)
    r = tw.RADIUS_FRACTION
    assert paths.min() >= r - 1e-9 and paths.max() <= 1 - r + 1e-9  # bounces keep objects inside
    assert (tw.render(w, 9, stride=4) == tw.render(w, 9)[::4]).all()


def test_ground_truth_scores_well(case):
    w, video, colours = case
    m = M.video_metrics(video, colours)
    assert m["subject"] > 0.9 and m["background"] > 0.95 and m["imaging"] > 0.7
    assert m["smoothness"] > 0.8 and m["freeze_loop"] == 0.0 and m["overall"] > 0.85
    true_speed = 100 * np.mean([np.hypot(*o.velocity) for o in w.objects])
    assert m["dynamic"] == pytest.approx(true_speed, rel=0.3)


def test_frozen_video_caught_by_dynamic_and_freeze(case):
    _, video, colours = case
    m = M.video_metrics(np.repeat(video[:1], FRAMES, axis=0), colours)
    assert m["dynamic"] == 0.0 and m["freeze_loop"] > 0.9 and m["overall"] < 0.1


def test_looped_video_caught_by_freeze_loop(case):
    _, video, colours = case
    looped = np.concatenate([video[:12]] * 4)[:FRAMES]
    assert M.video_metrics(looped, colours)["freeze_loop"] > 0.5


def test_shuffled_video_caught_by_smoothness(case):
    _, video, colours = case
    perm = np.random.default_rng(0).permutation(FRAMES)
    good = M.video_metrics(video, colours)
    m = M.video_metrics(video[perm], colours)
    assert m["smoothness"] < 0.3 and m["overall"] < good["overall"] - 0.1


def test_noise_video_caught_by_subject_background_imaging(case):
    _, video, colours = case
    noise = np.random.default_rng(0).integers(0, 256, video.shape, dtype=np.uint8)
    m = M.video_metrics(noise, colours)
    assert m["subject"] < 0.1 and m["background"] < 0.2 and m["imaging"] < 0.3 and m["overall"] < 0.2


def test_blur_lowers_imaging(case):
    _, video, colours = case
    x = torch.from_numpy(video).float().permute(0, 3, 1, 2)
    blurred = torch.nn.functional.avg_pool2d(x, 5, stride=1, padding=2, count_include_pad=False)
    blurred = blurred.round().byte().permute(0, 2, 3, 1).numpy()
    assert M.video_metrics(blurred, colours)["imaging"] < M.video_metrics(video, colours)["imaging"] - 0.2


def test_wrong_or_missing_objects_lower_subject(case):
    w, video, colours = case
    others = [c for c in tw.COLOURS if c not in colours]
    assert M.video_metrics(video, others[:2])["subject"] == 0.0  # neither prompted object, two extras
    assert M.video_metrics(video, colours + others[:1])["subject"] < 0.7  # one prompted object missing


# ---- motion over seconds, and counting artifacts ----------------------------------------------------------
# Synthetic videos with known answers, drawn with the world's own background and object masks. 97 frames
# (6 s at 16 fps) give 81 one-second windows per object.

MOTION_FRAMES = 97
PX = 1 / 64  # one pixel in frame sides


def draw(world, centres: np.ndarray) -> np.ndarray:
    """uint8 video [T, 64, 64, 3] of `world`'s background with its objects at centres [K, T, 2]."""
    bg = tw.background_image(world, 64)
    frames = []
    for t in range(centres.shape[1]):
        frame = bg.copy()
        for k, o in enumerate(world.objects):
            m = tw.object_mask(o.shape, tuple(centres[k, t]), 64)[..., None]
            frame = frame * (1 - m) + np.array(tw.PALETTE[o.colour]) * m
        frames.append(frame)
    return (np.stack(frames) * 255).round().astype(np.uint8)


def wobble(shape, sigma_px: float, seed: int = 0) -> np.ndarray:
    """Per-frame centre noise of a blob whose shape wobbles: Gaussian, sigma_px pixels per axis."""
    return np.random.default_rng(seed).normal(0, sigma_px * PX, shape)


@pytest.fixture(scope="module")
def motion_world():
    torch.set_num_threads(1)
    return tw.sample_world(11, num_objects=1)


def exact_travel(paths: np.ndarray) -> float:
    """Mean net one-second displacement of exact trajectories [K, T, 2], % of side per second."""
    w = 16  # one second at the renderer's 16 fps, written out so that the metric's constant is checked too
    return 100 * float(np.linalg.norm(paths[:, w:] - paths[:, :-w], axis=-1).mean())


def test_motion_of_ground_truth_matches_its_trajectories(motion_world):
    w = motion_world
    m = M.video_metrics(tw.render(w, MOTION_FRAMES), M.colours_of_prompt(w.prompt))
    assert m["travel"] == pytest.approx(exact_travel(tw.trajectories(w, MOTION_FRAMES)), rel=0.1)
    assert m["moving"] > 0.85 and m["coverage"] > 0.15
    speed = np.hypot(*w.objects[0].velocity)
    assert m["travel"] <= 100 * speed * M.TRAVEL_WINDOW * 1.02  # net displacement never beats the path


def test_frozen_video_does_not_move(motion_world):
    w = motion_world
    video = np.repeat(tw.render(w, 1), MOTION_FRAMES, axis=0)
    m = M.video_metrics(video, M.colours_of_prompt(w.prompt), reference=tw.render(w, MOTION_FRAMES))
    assert m["travel"] == 0.0 and m["moving"] == 0.0 and m["coverage"] == pytest.approx(1 / 64)
    ref = M.video_metrics(tw.render(w, MOTION_FRAMES), M.colours_of_prompt(w.prompt))
    assert m["travel_gap"] == pytest.approx(ref["travel"], rel=0.05)  # W1 to a point mass at 0 = the mean


def test_jitter_in_place_is_not_motion(motion_world):
    """A blob that wobbles by ~2 px a frame around one spot: the frame-to-frame `dynamic` reads it as moving
    as fast as the world's objects; travel, moving and coverage do not."""
    w = motion_world
    centres = np.full((1, MOTION_FRAMES, 2), 0.5) + wobble((1, MOTION_FRAMES, 2), 1.5)
    m = M.video_metrics(draw(w, centres), M.colours_of_prompt(w.prompt))
    assert m["dynamic"] > 100 * tw.SPEED_RANGE[0]  # the old metric is fooled
    assert m["travel"] < 100 * M.MIN_TRAVEL / 2 and m["moving"] < 0.05 and m["coverage"] <= 4 / 64


def test_overall_drops_for_an_object_that_stays_put(motion_world):
    """Same noisy background (sampled videos flicker, so freeze_loop does not fire), one object moving at
    the world's speed, one hovering within half a pixel: overall differs by about the weight of `moving`."""
    w = motion_world
    o = w.objects[0]
    speed = float(np.mean(tw.SPEED_RANGE))
    mover = tw.World(objects=(tw.WorldObject(o.colour, o.shape, (0.3, 0.2), (speed * 0.6, speed * 0.8)),),
                     background=w.background)
    flicker = np.random.default_rng(2).integers(-25, 26, (MOTION_FRAMES, 64, 64, 3))
    noisy = lambda v: np.clip(v.astype(int) + flicker, 0, 255).astype(np.uint8)  # noqa: E731
    colours = M.colours_of_prompt(w.prompt)
    moving = M.video_metrics(noisy(tw.render(mover, MOTION_FRAMES)), colours)
    hover = M.video_metrics(noisy(draw(w, np.full((1, MOTION_FRAMES, 2), 0.45) + wobble((1, MOTION_FRAMES, 2), 0.5))),
                            colours)
    assert moving["freeze_loop"] == 0.0 and hover["freeze_loop"] == 0.0
    assert moving["moving"] > 0.85 and hover["moving"] == 0.0
    assert hover["overall"] < moving["overall"] - 0.12


def test_strong_wobble_in_place_is_smoothed_away(motion_world):
    """2.5 px of wobble a frame: single-frame centres a second apart are often more than MIN_TRAVEL apart
    (about a fifth of the windows), the smoothed ones almost never."""
    w = motion_world
    centres = np.full((1, MOTION_FRAMES, 2), 0.45) + wobble((1, MOTION_FRAMES, 2), 2.5, seed=1)
    m = M.video_metrics(draw(w, centres), M.colours_of_prompt(w.prompt))
    assert m["moving"] < 0.05


def test_object_at_world_speed_moves_despite_wobble(motion_world):
    w = motion_world
    o = w.objects[0]
    speed = float(np.mean(tw.SPEED_RANGE))
    moved = tw.World(objects=(tw.WorldObject(o.colour, o.shape, (0.3, 0.2), (speed * 0.6, speed * 0.8)),),
                     background=w.background)
    paths = tw.trajectories(moved, MOTION_FRAMES)
    m = M.video_metrics(draw(moved, paths + wobble(paths.shape, 1.5)), M.colours_of_prompt(w.prompt),
                        reference=tw.render(moved, MOTION_FRAMES))
    assert m["travel"] == pytest.approx(exact_travel(paths), rel=0.1)
    assert m["moving"] > 0.85 and m["coverage"] > 0.15
    assert m["travel_gap"] < 3 and m["coverage_ratio"] == pytest.approx(1, abs=0.25)


def test_back_and_forth_over_a_short_stretch_is_not_travel(motion_world):
    """An object pacing 8 px back and forth at the world's speed: fast frame to frame, nowhere in seconds."""
    w = motion_world
    speed = float(np.mean(tw.SPEED_RANGE))
    t = np.arange(MOTION_FRAMES)
    stretch = 8 * PX
    u = np.mod(speed * t, 2 * stretch)
    x = 0.4 + np.where(u <= stretch, u, 2 * stretch - u)  # triangle wave: bounces off both ends
    centres = np.stack([np.full(MOTION_FRAMES, 0.5), x], -1)[None]
    m = M.video_metrics(draw(w, centres), M.colours_of_prompt(w.prompt), reference=tw.render(w, MOTION_FRAMES))
    assert m["dynamic"] == pytest.approx(100 * speed, rel=0.2)  # per frame it moves like the world
    assert m["travel"] < 100 * stretch * 1.1 and m["moving"] == 0.0 and m["coverage"] <= 4 / 64
    assert m["travel_gap"] > 10 and m["coverage_ratio"] < 0.5


def test_coverage_counts_cells_of_a_known_path(motion_world):
    """A straight pass across the reachable square along one row visits exactly that row's 8 cells."""
    w = motion_world
    r = tw.RADIUS_FRACTION
    x = np.linspace(r, 1 - r, MOTION_FRAMES)
    y = np.full(MOTION_FRAMES, r + (1 - 2 * r) * 2.5 / M.COVERAGE_CELLS)  # centre of the third row
    m = M.video_metrics(draw(w, np.stack([y, x], -1)[None]), M.colours_of_prompt(w.prompt))
    assert m["coverage"] == pytest.approx(M.COVERAGE_CELLS / M.COVERAGE_CELLS**2)


def test_duplicated_and_missing_objects_counted_apart(motion_world):
    w = motion_world
    o = w.objects[0]
    twin = tw.World(objects=(o, tw.WorldObject(o.colour, o.shape, (0.75, 0.75), o.velocity)), background=w.background)
    centres = np.array([np.full((9, 2), 0.25), np.full((9, 2), 0.75)])  # two blobs of the prompted colour
    colours = M.colours_of_prompt(w.prompt)
    m = M.video_metrics(draw(twin, centres), colours)
    assert m["duplicated"] == 1.0 and m["missing"] == 0.0 and m["subject"] == 0.0
    empty = tw.World(objects=(), background=w.background)
    m = M.video_metrics(draw(empty, np.zeros((0, 9, 2))), colours)
    assert m["missing"] == 1.0 and m["duplicated"] == 0.0 and m["subject"] == 0.0
    m = M.video_metrics(tw.render(w, 9), colours)
    assert m["missing"] == 0.0 and m["duplicated"] == 0.0
