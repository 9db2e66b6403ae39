"""The shipped testbed checkpoint (assets/toy-wan) loads through the production loader and renders, at its
trained length (T = 13 latent frames, 49 video frames), videos in which the prompted objects are found far
more often than objects not prompted.

The bar is set below what the shipped (55-minute CPU) checkpoint does: bench/quality.py finds each prompted
object once in 56% of frames at 1x (10 steps; 8 held-out worlds), objects of other colours rarely."""

import pytest
import torch

from freeloc_dist.config import REPO_ROOT, load_render_config
from freeloc_dist.families.wan.toy import TRAINED_FRAMES
from freeloc_dist.families.wan.toy_train import EVAL_SEED_BASE
from freeloc_dist.models import load_components
from freeloc_dist.sampling import render
from freeloc_dist.testbed import metrics as M
from freeloc_dist.testbed import world as tw

pytestmark = pytest.mark.unit

CONFIG = REPO_ROOT / "configs/tiny.yaml"


@pytest.mark.skipif(not (REPO_ROOT / "assets/toy-wan/model_index.json").is_file(), reason="no toy checkpoint")
def test_toy_checkpoint_renders_prompted_objects_at_trained_length():
    torch.set_num_threads(1)
    cfg0 = load_render_config(CONFIG)
    parts = load_components(cfg0.model.path, cfg0.model.dtype)
    frames_at_t = 4 * (TRAINED_FRAMES - 1) + 1
    prompted, other = [], []
    for i in range(4):
        w = tw.sample_world(EVAL_SEED_BASE + i)
        cfg = load_render_config(CONFIG, {"prompt": w.prompt, "video.frames": frames_at_t, "sampling.seed": i})
        frames = render(parts, cfg).frames
        assert frames.shape == (frames_at_t, 64, 64, 3)
        colours = M.colours_of_prompt(w.prompt)
        prompted.extend(M.analyse(frames, colours)["found"].mean(0))
        other.extend(M.analyse(frames, [c for c in tw.COLOURS if c not in colours])["found"].mean(0))
    found, found_other = sum(prompted) / len(prompted), sum(other) / len(other)
    assert found > 0.4 and found > 3 * found_other, (found, found_other)
