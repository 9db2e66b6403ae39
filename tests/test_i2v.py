"""Image-to-video (Wan2.1 I2V, Wan2.2 I2V-A14B, Wan2.1 FLF2V) in this process: the render against diffusers'
own WanImageToVideoPipeline on the tiny models (F <= T, float32, final latents within 1e-4: the same float32
math in another order over 4 steps; measured ~5e-7), the conditioning's layout, image loading and fitting,
TSA sinks on the conditioning frames, the loader, the fingerprint and the planner."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from _tiny import rel_err
from PIL import Image

from freeloc_dist.config import REPO_ROOT, parse_render_config
from freeloc_dist.family import read_model_kind

pytestmark = pytest.mark.unit
ASSETS = REPO_ROOT / "assets"
FIRST, LAST = ASSETS / "i2v-first.png", ASSETS / "i2v-last.jpg"


def test_kinds_of_the_i2v_models():
    i2v = read_model_kind(ASSETS / "tiny-i2v")
    assert (i2v.task, i2v.pipeline, i2v.in_channels, i2v.image_tokens, i2v.first_last_frame) == (
        "i2v", "WanImageToVideoPipeline", 12, 5, False)
    a14b = read_model_kind(ASSETS / "tiny-i2v-a14b")
    assert (a14b.task, a14b.experts, a14b.boundary_ratio, a14b.image_tokens) == (
        "i2v", ("transformer", "transformer_2"), 0.9, 0)
    flf = read_model_kind(ASSETS / "tiny-flf2v")
    assert (flf.task, flf.image_tokens, flf.first_last_frame) == ("i2v", 10, True)


def _cfg(model, *, frames=17, size=32, steps=4, last=False, **sampling):
    return parse_render_config({
        "model": {"path": str(ASSETS / model), "dtype": "float32"},
        "video": {"height": size, "width": size, "frames": frames},
        "sampling": {"steps": steps, "guidance_scale": 4.0, "shift": 3.0, "seed": 3, "max_text_tokens": 512,
                     "negative_prompt": "blurry", **sampling},
        "prompt": "a fox", "image": str(FIRST), **({"last_image": str(LAST)} if last else {})})


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two random 48x48 frames (square, like the 32x32 render, so diffusers' plain resize and our fit give
    the same pixels; both CLIPs get the image as read): (first path, last path, first, last)."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("frames")
    paths = []
    for name in ("first.png", "last.png"):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / name)
        paths.append(folder / name)
    return (*paths, *(Image.open(p).convert("RGB") for p in paths))


@pytest.mark.parametrize("model, last, sampling", [
    ("tiny-i2v", False, {}),
    ("tiny-i2v-a14b", False, {"guidance_scale_2": 2.5}),
    ("tiny-flf2v", True, {}),
], ids=["wan2.1-i2v", "wan2.2-i2v-a14b", "flf2v"])
@torch.no_grad()
def test_render_equals_diffusers_image_to_video_pipeline(images, model, last, sampling):
    """Conditioning channels, mask, CLIP tokens (both CFG passes), expert switch: our loop vs the pipeline."""
    from diffusers import WanImageToVideoPipeline

    from freeloc_dist.models import load_components
    from freeloc_dist.sampling import encode_prompt, initial_noise, latent_geometry, render, scheduler_for_render

    first_path, last_path, first, final = images
    parts = load_components(ASSETS / model, "float32")
    cfg = dataclasses.replace(_cfg(model, last=last, **sampling), image=first_path,
                              last_image=last_path if last else None)
    s = cfg.sampling
    ours = render(parts, cfg, decode=False).latents
    if parts.transformer_2 is not None:
        scheduler = scheduler_for_render(parts.scheduler, s.shift)
        scheduler.set_timesteps(s.steps)
        below = [float(t) < 900 for t in scheduler.timesteps]
        assert any(below) and not all(below), scheduler.timesteps  # both experts run
    pipe = WanImageToVideoPipeline(
        tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
        scheduler=scheduler_for_render(parts.scheduler, s.shift), transformer=parts.transformer,
        transformer_2=parts.transformer_2, boundary_ratio=parts.boundary_ratio, image_encoder=parts.image_encoder,
        image_processor=parts.image_processor)
    pipe.set_progress_bar_config(disable=True)
    size = (cfg.video.height, cfg.video.width)
    theirs = pipe(image=first, last_image=final if last else None,
                  prompt_embeds=encode_prompt(parts, cfg.prompt, 512),
                  negative_prompt_embeds=encode_prompt(parts, s.negative_prompt, 512),
                  latents=initial_noise(latent_geometry(parts.vae, parts.transformer, 17, *size), s.seed, "cpu"),
                  height=size[0], width=size[1], num_frames=cfg.video.frames, num_inference_steps=s.steps,
                  guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2, output_type="latent",
                  return_dict=False)[0]
    assert rel_err(ours, theirs) < 1e-4
    # the conditioning matters: another first frame moves the result far past the tolerance
    other = render(parts, dataclasses.replace(cfg, image=FIRST), decode=False).latents
    assert rel_err(other, theirs) > 1e-2


def test_mask_marks_the_given_frames():
    """Latent frame 0 stands for video frame 0 (all 4 channels); frame f >= 1 for video frames 4f-3 .. 4f, so
    FLF2V's last image (video frame V-1) is the last latent frame's last channel only."""
    from freeloc_dist.families.wan.conditioning import frame_mask, sink_frames

    first = frame_mask(4, 4, False, 1, 1)[0, :, :, 0, 0]  # [channel, latent frame]
    assert first.tolist() == [[1, 0, 0, 0]] * 4
    both = frame_mask(4, 4, True, 1, 1)[0, :, :, 0, 0]
    assert both.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 1]]
    assert sink_frames(9, False) == (0,) and sink_frames(9, True) == (0, 8)


def test_condition_is_sliced_like_the_latents():
    from freeloc_dist.families.wan.conditioning import Conditioning

    cond = Conditioning(latents=torch.arange(2 * 6.0).view(1, 2, 6, 1, 1), image_embeds=None)
    x = torch.zeros(1, 3, 2, 1, 1)
    got = cond.input_for(x, 3, 5)
    assert got.shape == (1, 5, 2, 1, 1) and got[0, 3:, :, 0, 0].tolist() == [[3, 4], [9, 10]]
    assert cond.transformer_kwargs() == {}


def test_fit_covers_and_centre_crops():
    from freeloc_dist.images import fit

    img = Image.fromarray(np.arange(40 * 80 * 3, dtype=np.uint32).reshape(40, 80, 3).astype(np.uint8))
    out = fit(img, 32, 32)
    assert out.size == (32, 32)
    wide = img.resize((64, 32), resample=Image.LANCZOS)  # cover: scale to height 32, crop the middle 32 columns
    assert np.array_equal(np.asarray(out), np.asarray(wide)[:, 16:48])
    # the same aspect ratio: diffusers' plain resize exactly
    assert np.array_equal(np.asarray(fit(img, 20, 40)), np.asarray(img.resize((40, 20), resample=Image.LANCZOS)))


def _save(path, mode, size=(8, 8), fmt=None, **info):
    img = Image.new(mode, size)
    img.save(path, format=fmt, **info)
    return path


def test_load_image_accepts_and_refuses(tmp_path):
    from freeloc_dist.images import ImageError, load_image

    assert load_image(_save(tmp_path / "g.png", "L")).mode == "RGB"
    opaque = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    opaque.save(tmp_path / "o.png")
    assert load_image(tmp_path / "o.png").getpixel((0, 0)) == (10, 20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF orientation: shown rotated by 90 degrees (a phone held upright)
    Image.new("RGB", (12, 8)).save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (8, 12)
    bad = {
        "missing": (tmp_path / "nope.png", "file not found"),
        "dir": (tmp_path, "is a directory"),
        "text": (tmp_path / "t.png", "not an image"),
        "gif": (_save(tmp_path / "a.gif", "P", fmt="GIF"), "a GIF image; expected PNG or JPEG"),
        "cmyk": (_save(tmp_path / "c.jpg", "CMYK"), "colour mode CMYK is not supported"),
        "16-bit": (_save(tmp_path / "i.png", "I;16"), "colour mode I;16 is not supported"),
        "alpha": (_save(tmp_path / "a.png", "RGBA"), "has transparent pixels"),
        "truncated": (tmp_path / "cut.png", "cannot"),
    }
    (tmp_path / "t.png").write_text("not a picture")
    whole = (ASSETS / "i2v-first.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    for name, (path, needle) in bad.items():
        with pytest.raises(ImageError) as info:
            load_image(path, "image")
        text = str(info.value)
        assert needle in text and text.startswith("image=") and "\n" not in text, (name, text)


@torch.no_grad()
def test_tsa_sinks_default_to_the_conditioning_frames():
    from freeloc_dist.families.wan.conditioning import condition_of_render
    from freeloc_dist.install import apply_freeloc
    from freeloc_dist.models import load_components

    parts = load_components(ASSETS / "tiny-flf2v", "float32")
    apply_freeloc(parts.transformer, REPO_ROOT / "configs" / "profiles" / "tiny-random-i2v.yaml")
    cfg = _cfg("tiny-flf2v", frames=33, last=True)  # 9 latent frames
    condition_of_render(parts, cfg, device="cpu", dtype=torch.float32)
    assert parts.transformer.freeloc_state.profile.tsa.sink_frames == (0, 8)
    condition_of_render(parts, dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, frames=21)),
                        device="cpu", dtype=torch.float32)
    assert parts.transformer.freeloc_state.profile.tsa.sink_frames == (0, 5)  # follows the length
    # a profile that names its sinks keeps them
    apply_freeloc(parts.transformer, REPO_ROOT / "configs" / "profiles" / "tiny-random.yaml")
    condition_of_render(parts, cfg, device="cpu", dtype=torch.float32)
    assert parts.transformer.freeloc_state.profile.tsa.sink_frames == (0,)


def test_loader_checks_and_signs_the_image_encoder(tmp_path):
    from freeloc_dist.config import ConfigError
    from freeloc_dist.models import check_model_dir, check_weights_match_config, weights_signature

    model = tmp_path / "m"
    shutil.copytree(ASSETS / "tiny-i2v", model)
    assert any(f.startswith("image_encoder/") for f, _, _ in weights_signature(model))
    check_weights_match_config(model)
    path = model / "image_encoder" / "config.json"
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "num_hidden_layers": 3}))
    with pytest.raises(ConfigError, match="image_encoder/config.json disagrees with its weights"):
        check_weights_match_config(model)
    (model / "image_processor" / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match="missing image_processor/preprocessor_config.json"):
        check_model_dir(model)


def test_fingerprint_covers_the_image(tmp_path):
    from freeloc_dist.checkpoint import fingerprint

    image = tmp_path / "i.png"
    shutil.copy(FIRST, image)
    cfg = dataclasses.replace(_cfg("tiny-i2v"), image=image)
    before = fingerprint(cfg, None)
    Image.open(LAST).convert("RGB").save(image)  # the same path, another picture
    assert fingerprint(cfg, None) != before
    t2v = parse_render_config({"model": {"path": str(ASSETS / "tiny-wan")}, "video": {"height": 32, "width": 32,
                                                                                     "frames": 17}})
    assert "image" not in __import__("freeloc_dist.checkpoint", fromlist=["x"]).fingerprint_settings(t2v, None)


def test_planner_counts_clip_and_the_image_embedder():
    """Every weight of the tiny Wan2.1 I2V and FLF2V models, counted from their configs exactly; the real
    Wan2.1-I2V-14B shapes (built on the meta device) too."""
    from diffusers import WanTransformer3DModel

    from freeloc_dist.families.wan.counts import image_encoder_params
    from freeloc_dist.models import load_components
    from freeloc_dist.planner import KNOWN_TRANSFORMERS, plan_render, transformer_params

    for model in ("tiny-i2v", "tiny-flf2v"):
        parts = load_components(ASSETS / model, "float32")
        tcfg = json.loads((ASSETS / model / "transformer" / "config.json").read_text())
        clip = json.loads((ASSETS / model / "image_encoder" / "config.json").read_text())
        assert transformer_params(tcfg) == sum(p.numel() for p in parts.transformer.parameters())
        assert image_encoder_params(clip) == sum(p.numel() for p in parts.image_encoder.parameters())
        cfg = _cfg(model, last=model == "tiny-flf2v")
        plan = plan_render(cfg, tcfg, world_size=1, model_kind=read_model_kind(ASSETS / model),
                           image_encoder_cfg=clip)
        assert plan.memory_bytes["weights: image encoder"] == image_encoder_params(clip) * 4
        v = cfg.video
        assert plan.memory_bytes["conditioning video (once)"] == 3 * 4 * v.frames * v.height * v.width
        assert plan.memory_bytes["conditioning"] == 8 * cfg.latent_frames * (v.height // 8) * (v.width // 8) * 4
    real = KNOWN_TRANSFORMERS["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"]
    with torch.device("meta"):
        built = WanTransformer3DModel(**real)
    assert transformer_params(real) == sum(p.numel() for p in built.parameters())
    assert image_encoder_params(None) == 630_766_080  # CLIP ViT-H/14 (transformers' CLIPVisionModel)
