"""The generation side end to end on the tiny Wan: save -> load -> sample -> decode -> mp4."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from freeloc_dist.config import REPO_ROOT, ConfigError, parse_render_config
from freeloc_dist.decode import decode_video
from freeloc_dist.families.wan.vae import denormalise
from freeloc_dist.models import Components, check_model_dir, load_components
from freeloc_dist.sampling import (
    encode_prompt,
    latent_geometry,
    predict_noise,
    render,
)
from freeloc_dist.video import read_mp4_frame_count, save_latents, to_uint8, write_mp4

pytestmark = pytest.mark.unit


def make_cfg(model_dir, **over):
    raw = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "video": {"height": 32, "width": 48, "frames": 9, "fps": 8},
        "sampling": {"steps": 3, "guidance_scale": 4.0, "seed": 7, "max_text_tokens": 16,
                     "negative_prompt": "blurry"},
        "prompt": "a red fox in snow",
    }
    return parse_render_config(raw, over)


@pytest.fixture(scope="module")
def parts(tiny_model_dir):
    return load_components(tiny_model_dir, "float32", "cpu")


def test_load_components(parts):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import UMT5EncoderModel

    assert isinstance(parts, Components)
    assert isinstance(parts.transformer, WanTransformer3DModel)
    assert isinstance(parts.vae, AutoencoderKLWan)
    assert isinstance(parts.text_encoder, UMT5EncoderModel)
    assert isinstance(parts.scheduler, SchedulerMixin)
    assert not parts.transformer.training and not parts.vae.training


def _weight_files(model_dir) -> list[Path]:
    """The weight files of a saved model: one per weighted component, so a loop over them cannot be empty."""
    files = sorted(Path(model_dir).rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"transformer", "vae", "text_encoder"}, files
    return files


def test_saved_model_is_small_and_deterministic(tiny_model_dir, tmp_path):
    from freeloc_dist.families.wan.tiny import save_tiny_model

    size = sum(p.stat().st_size for p in Path(tiny_model_dir).rglob("*") if p.is_file())
    assert size < 5 * 2**20
    again = save_tiny_model(tmp_path / "again", seed=0)
    for weights in _weight_files(tiny_model_dir):
        a, b = load_file(weights), load_file(again / weights.relative_to(tiny_model_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_committed_asset_matches_builder(tiny_model_dir):
    """assets/tiny-wan is what launch/make_tiny.py writes with the defaults (regenerate it if this fails)."""
    asset = REPO_ROOT / "assets" / "tiny-wan"
    for weights in _weight_files(tiny_model_dir):
        a, b = load_file(weights), load_file(asset / weights.relative_to(tiny_model_dir))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), weights


@pytest.mark.parametrize("missing", ["model_index.json", "scheduler/scheduler_config.json",
                                     "transformer/diffusion_pytorch_model.safetensors", "tokenizer"])
def test_check_model_dir_names_missing_file(tiny_model_dir, tmp_path, missing):
    copy = tmp_path / "m"
    shutil.copytree(tiny_model_dir, copy)
    target = copy / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(ConfigError) as info:
        check_model_dir(copy)
    text = str(info.value)
    assert text.startswith("config error: model.path=") and "\n" not in text
    assert Path(missing).parts[0] in text
    with pytest.raises(ConfigError, match="model directory not found"):
        load_components(tmp_path / "nope", "float32", "cpu")


def test_encode_prompt_zeroes_padding(parts):
    emb = encode_prompt(parts, "abc", 16)  # 3 bytes + </s> = 4 real tokens
    assert emb.shape == (1, 16, parts.text_encoder.config.d_model)
    assert emb[0, :4].abs().sum(-1).gt(0).all()
    assert emb[0, 4:].abs().sum() == 0


def test_render_writes_requested_frames(parts, tiny_model_dir, tmp_path):
    cfg = make_cfg(tiny_model_dir)
    result = render(parts, cfg)
    geo = latent_geometry(parts.vae, parts.transformer, 9, 32, 48)
    assert result.latents.shape == geo.shape == (1, 4, 3, 4, 6)
    assert result.latents.dtype == torch.float32 and torch.isfinite(result.latents).all()
    assert result.frames.shape == (9, 32, 48, 3) and result.frames.dtype == np.uint8
    out = write_mp4(tmp_path / "v.mp4", result.frames, fps=cfg.video.fps)
    assert read_mp4_frame_count(out) == 9
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary left behind
    lat = save_latents(tmp_path / "lat.safetensors", result.latents)
    assert torch.equal(load_file(lat)["latents"], result.latents)


def test_same_seed_same_latents(parts, tiny_model_dir):
    cfg = make_cfg(tiny_model_dir)
    a = render(parts, cfg, decode=False).latents
    b = render(parts, cfg, decode=False).latents
    c = render(parts, make_cfg(tiny_model_dir, **{"sampling.seed": 8}), decode=False).latents
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_guidance_passes_and_predict_is_replaceable(parts, tiny_model_dir):
    calls = []

    def counting(transformer, latents, t, cond, uncond, guidance):
        calls.append(uncond is not None and guidance > 1)
        return predict_noise(transformer, latents, t, cond, uncond, guidance)

    ref = render(parts, make_cfg(tiny_model_dir), decode=False).latents
    got = render(parts, make_cfg(tiny_model_dir), decode=False, predict=counting).latents
    assert torch.equal(ref, got) and calls == [True] * 3

    forwards = []
    hook = parts.transformer.register_forward_hook(lambda *a: forwards.append(1))
    try:
        render(parts, make_cfg(tiny_model_dir, **{"sampling.guidance_scale": 1.0}), decode=False)
        assert len(forwards) == 3  # no unconditional pass
        forwards.clear()
        render(parts, make_cfg(tiny_model_dir), decode=False)
        assert len(forwards) == 6
    finally:
        hook.remove()


def test_streaming_decode_matches_vae_decode(parts):
    latents = torch.randn(1, 4, 3, 4, 6, generator=torch.Generator().manual_seed(0))
    ours = decode_video(parts.vae, latents)
    with torch.no_grad():
        ref = to_uint8(parts.vae.decode(denormalise(parts.vae, latents)).sample)
    assert ours.shape == (9, 32, 48, 3)
    assert np.array_equal(ours, ref)


def test_write_mp4_is_atomic(tmp_path, monkeypatch):
    import imageio_ffmpeg

    real = imageio_ffmpeg.write_frames

    def failing(*args, **kwargs):
        gen = real(*args, **kwargs)

        class Writer:
            def send(self, frame):
                if frame is not None:
                    raise RuntimeError("disk full")
                return gen.send(frame)

            def close(self):
                gen.close()

        return Writer()

    frames = np.zeros((5, 16, 16, 3), np.uint8)
    monkeypatch.setattr(imageio_ffmpeg, "write_frames", failing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_mp4(tmp_path / "v.mp4", frames, fps=8)
    assert list(tmp_path.iterdir()) == []
