"""apply_freeloc on a diffusers WanTransformer3DModel: stock when F <= T, the oracle when F > T."""

import pytest
import torch
from _tiny import THREE_LAYERS, rel_err, tiny_transformer, transformer_inputs

from freeloc_dist import apply_freeloc, load_profile
from freeloc_dist.profile import ProfileError

pytestmark = pytest.mark.unit

TOL = 1e-5  # see test_attention.py: float32 kernels vs the float64 oracle backend

PROFILE = THREE_LAYERS  # tests/_tiny.py: one layer of each kind, T = 4


@torch.no_grad()
def _run(model, num_frames):
    return model(**transformer_inputs(num_frames))[0]


@pytest.mark.parametrize("num_frames", [1, 3, 4])
def test_short_video_equals_stock(num_frames):
    model = tiny_transformer(num_layers=3)
    stock = _run(model, num_frames)
    apply_freeloc(model, PROFILE)
    assert torch.equal(_run(model, num_frames), stock)


@pytest.mark.parametrize("backend", ["sdpa", "sdpa-math", "flex"])
@pytest.mark.parametrize("num_frames", [5, 19])
def test_long_video_backends_match_reference(backend, num_frames):
    model = tiny_transformer(num_layers=3)
    stock = _run(model, num_frames)
    apply_freeloc(model, PROFILE, backend="reference")
    reference = _run(model, num_frames)
    apply_freeloc(model, PROFILE, backend=backend)
    out = _run(model, num_frames)
    assert rel_err(out, reference) < TOL
    assert rel_err(out, stock) > 1e-4  # FreeLOC actually changed something


def test_one_install_serves_every_length():
    model = tiny_transformer(num_layers=3)
    stock_short = _run(model, 3)
    apply_freeloc(model, PROFILE)
    long_out = _run(model, 12)
    assert torch.equal(_run(model, 3), stock_short)
    assert long_out.shape[2] == 12


def test_published_profile_installs_on_a_30_layer_model():
    model = tiny_transformer(num_layers=30, heads=2)
    apply_freeloc(model, "configs/profiles/wan2.1-t2v-1.3b.yaml")
    kinds = [block.attn1.processor.kind for block in model.blocks]
    published_tsa = [0, 1, 4, 6, 7, 9, 10, 11, 13, 14, 15, 16, 18, 22, 23, 24, 25]
    assert [i for i, k in enumerate(kinds) if k == "tsa"] == published_tsa
    assert all(block.attn2.processor.__class__.__name__ == "WanAttnProcessor" for block in model.blocks)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["layers"].update(full=[3]), "missing \\[2\\]"),
        (lambda p: p["layers"].update(full=[1]), "listed twice"),
        (lambda p: p["layers"].update(dense=[2]), "unknown kind"),
        (lambda p: p.pop("trained_frames"), "trained_frames: missing"),
        (lambda p: p.update(trained_frames="21"), "must be an integer"),
        (lambda p: p.update(tsa={"dense_frames": 4, "stripe_frames": 2}), "stripe_frames"),
    ],
)
def test_bad_profiles_are_rejected(change, message):
    profile = {**PROFILE, "layers": dict(PROFILE["layers"])}
    change(profile)
    with pytest.raises(ProfileError, match=message):
        load_profile(profile)


def test_layer_count_must_match_model():
    with pytest.raises(ProfileError, match="lists 3 layers, the transformer has 2"):
        apply_freeloc(tiny_transformer(num_layers=2), PROFILE)


def test_missing_profile_file():
    with pytest.raises(ProfileError, match="file not found"):
        load_profile("configs/profiles/does-not-exist.yaml")
