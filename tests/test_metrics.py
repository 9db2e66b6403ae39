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
