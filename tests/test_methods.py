"""Long-video methods (freeloc_dist.methods): window fusion, FreeNoise rescheduling, RIFLEx, FreeLOC
variants, and the rule that every method is direct sampling when F <= T."""

import pytest
import torch

from freeloc_dist import methods as M
from freeloc_dist.sampling import LatentGeometry, initial_noise
from tests._tiny import tiny_transformer, transformer_inputs

pytestmark = pytest.mark.unit

T = 4
PROFILE = {"model": "tiny", "trained_frames": T, "source": "test",
           "layers": {"tsa": [0], "vrpr": [1], "full": []}, "tsa": {"dense_frames": 1, "stripe_frames": 3}}
LONG = {**PROFILE, "long_range": {"layers": [1], "band_frames": 1, "stride_frames": 3}}


def _predict(method, tr, num_frames):
    x = transformer_inputs(num_frames)
    undo = method.install(tr, num_frames)
    try:
        return method.predict(tr, x["hidden_states"], x["timestep"][0], x["encoder_hidden_states"],
                              x["encoder_hidden_states"] * 0.5, 3.0)
    finally:
        undo()


@pytest.mark.parametrize("f,w,s", [(5, 5, 2), (11, 4, 2), (12, 4, 3), (13, 5, 2), (7, 3, 3)])
def test_window_starts_cover_and_end_at_f(f, w, s):
    starts = M.window_starts(f, w, s)
    covered = set().union(*(range(a, a + w) for a in starts))
    assert covered == set(range(f)) and starts[0] == 0 and starts[-1] == f - w


def test_window_stride_longer_than_window_is_refused():
    with pytest.raises(ValueError, match="stride"):
        M.window_starts(7, 3, 5)


def test_windowed_fusion_is_exact_for_consistent_predictions():
    inner = lambda tr, x, t, c, u, g: 2 * x.float()  # noqa: E731
    x = torch.randn(1, 3, 11, 2, 2)
    for weights in ("uniform", "centre"):
        out = M.windowed_predict(4, 2, weights, inner)(None, x, None, None, None, 1.0)
        torch.testing.assert_close(out, 2 * x)


def test_freenoise_noise_reuses_first_window_frames():
    geo = LatentGeometry(channels=2, frames=13, height=2, width=2)
    z = M.freenoise_noise(4, 2)(geo, 7, "cpu")
    base = initial_noise(geo, 7, "cpu")
    torch.testing.assert_close(z[:, :, :4], base[:, :, :4])
    for f in range(4, 13):
        assert any(torch.equal(z[:, :, f], base[:, :, j]) for j in range(4))
    torch.testing.assert_close(z, M.freenoise_noise(4, 2)(geo, 7, "cpu"))


def test_riflex_lowers_intrinsic_frequency_and_undo_restores():
    tr = tiny_transformer()
    k = M.riflex_frequency(tr.rope.t_dim, T)
    before = tr.rope.freqs_cos.clone()
    undo = M.install_riflex(tr, 3 * T, T)
    period = 2 * torch.pi / torch.acos(tr.rope.freqs_cos[1, 2 * k]).item()
    assert period > 3 * T  # one period covers the whole video
    assert torch.equal(tr.rope.freqs_cos[:, 2 * k + 2:], before[:, 2 * k + 2:])  # other columns untouched
    undo()
    assert torch.equal(tr.rope.freqs_cos, before)


def test_profile_variants_keep_layer_counts():
    allm = M.profile_variant(PROFILE, "freeloc-all")
    assert allm["layers"]["tsa"] == [0, 1]
    rnd = M.profile_variant(PROFILE, "freeloc-random", seed=3)
    assert sorted(rnd["layers"]["tsa"] + rnd["layers"]["vrpr"]) == [0, 1] and len(rnd["layers"]["tsa"]) == 1


@pytest.mark.parametrize("name", M.METHODS)
def test_every_method_is_direct_when_f_le_t_and_undo_restores(name):
    torch.set_num_threads(1)
    tr = tiny_transformer()
    method = M.get_method(name, trained_frames=T, profile=PROFILE, stride=2, long_profile=LONG)
    direct = M.get_method("direct", trained_frames=T)
    torch.testing.assert_close(_predict(method, tr, T), _predict(direct, tr, T), rtol=1e-5, atol=1e-5)
    long_direct = _predict(direct, tr, 3 * T)
    long = _predict(method, tr, 3 * T)
    if name != "direct":
        assert (long - long_direct).abs().max() > 1e-4  # the method does change long renders
    torch.testing.assert_close(_predict(direct, tr, 3 * T), long_direct)  # undo left the model stock


def test_freeloc_long_uses_the_long_variant_beside_the_profile(tmp_path):
    import yaml

    (tmp_path / "p.yaml").write_text(yaml.safe_dump(PROFILE))
    (tmp_path / "p-long.yaml").write_text(yaml.safe_dump(LONG))
    assert M.long_variant(tmp_path / "p.yaml") == str(tmp_path / "p-long.yaml")
    tr = tiny_transformer()
    long = _predict(M.get_method("freeloc-long", trained_frames=T, profile=tmp_path / "p.yaml"), tr, 3 * T)
    plain = _predict(M.get_method("freeloc", trained_frames=T, profile=PROFILE), tr, 3 * T)
    assert (long - plain).abs().max() > 1e-4  # the long range changes the render
    with pytest.raises(ValueError, match="needs a profile path"):
        M.get_method("freeloc-long", trained_frames=T, profile=PROFILE)
