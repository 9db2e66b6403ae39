"""Wan2.2 TI2V-5B on the tiny TI2V model (assets/tiny-ti2v: 48-channel residual VAE at 16x, per-token
timesteps): at F <= T our render equals diffusers' own pipelines, WanPipeline (text mode) and
WanImageToVideoPipeline with expand_timesteps (image mode), float32 latents within 1e-4 relative (the same
float32 math in another order, a few steps); decode through the residual VAE; planner and profile checks
against the real 5B's configs (written here without weights).

Mutants each test was seen to fail on are listed in the report of the ti2v branch.
"""

import dataclasses
import json

import pytest
import torch
from _tiny import rel_err

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
MODEL = REPO_ROOT / "assets" / "tiny-ti2v"
TOL = 1e-4
# The published Wan-AI/Wan2.2-TI2V-5B-Diffusers configs (the keys the engine reads), no weights.
TRANSFORMER_5B = {"_class_name": "WanTransformer3DModel", "num_layers": 30, "num_attention_heads": 24,
                  "attention_head_dim": 128, "ffn_dim": 14336, "in_channels": 48, "out_channels": 48,
                  "text_dim": 4096, "freq_dim": 256, "patch_size": [1, 2, 2]}
VAE_5B = {"_class_name": "AutoencoderKLWan", "z_dim": 48, "is_residual": True, "patch_size": 2, "in_channels": 12,
          "out_channels": 12, "scale_factor_spatial": 16, "scale_factor_temporal": 4,
          "dim_mult": [1, 2, 4, 4], "temperal_downsample": [False, True, True]}


@pytest.fixture(scope="module")
def parts():
    from freeloc_dist.models import load_components

    return load_components(MODEL, "float32", "cpu")


def _cfg(frames=9, steps=4, guidance=4.0, seed=3):
    from freeloc_dist.config import parse_render_config

    return parse_render_config({
        "model": {"path": str(MODEL), "dtype": "float32"}, "video": {"height": 64, "width": 64, "frames": frames},
        "sampling": {"steps": steps, "guidance_scale": guidance, "shift": 5.0, "seed": seed, "max_text_tokens": 16,
                     "negative_prompt": "blurry"},
        "prompt": "a fox"})


def _pipe_args(parts, cfg):
    from freeloc_dist.sampling import encode_prompt, initial_noise, latent_geometry

    s, v = cfg.sampling, cfg.video
    geometry = latent_geometry(parts.vae, parts.transformer, v.frames, v.height, v.width)
    return dict(prompt_embeds=encode_prompt(parts, cfg.prompt, 16),
                negative_prompt_embeds=encode_prompt(parts, s.negative_prompt, 16),
                latents=initial_noise(geometry, s.seed, "cpu"), height=v.height, width=v.width, num_frames=v.frames,
                num_inference_steps=s.steps, guidance_scale=s.guidance_scale, output_type="latent",
                return_dict=False)


def _image(seed=0):
    """A 64x64 RGB PIL image with structure (a gradient and a square), built here."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.float32)
    rgb[20:40, 24:44] = rng.uniform(0, 255, 3)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8))


def test_kind_of_the_committed_model():
    from freeloc_dist.family import read_model_kind

    kind = read_model_kind(MODEL)
    assert (kind.task, kind.expand_timesteps, kind.experts, kind.latent_channels, kind.in_channels) == (
        "ti2v", True, ("transformer",), 48, 48)
    assert (kind.vae_spatial, kind.vae_temporal, kind.tokens_per_pixel_axis) == (16, 4, (32, 32))
    assert kind.trained_frames == 5  # declared by the tiny model; the family's T (31) without it
    vae = json.loads((MODEL / "vae" / "config.json").read_text())
    assert vae["is_residual"] and vae["patch_size"] == 2 and len(vae["latents_mean"]) == len(vae["latents_std"]) == 48


def test_committed_model_matches_builder():
    """assets/tiny-ti2v is what `launch/make_tiny.py --family ti2v` writes (regenerate it if this fails)."""
    from safetensors.torch import load_file

    from freeloc_dist.families.wan.tiny import build_tiny_ti2v_components

    built = build_tiny_ti2v_components(seed=0)
    for sub, model in (("transformer", built.transformer), ("vae", built.vae)):
        saved = load_file(MODEL / sub / "diffusion_pytorch_model.safetensors")
        state = model.state_dict()
        assert saved.keys() == state.keys() and all(torch.equal(saved[k], state[k]) for k in saved), sub
    assert list(built.vae.config.latents_std) == json.loads((MODEL / "vae" / "config.json").read_text())["latents_std"]


@torch.no_grad()
def test_text_mode_equals_diffusers_wan_pipeline(parts):
    from diffusers import WanPipeline

    from freeloc_dist.sampling import render, scheduler_for_render

    cfg = _cfg()
    ours = render(parts, cfg, decode=False).latents
    pipe = WanPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                       scheduler=scheduler_for_render(parts.scheduler, cfg.sampling.shift),
                       transformer=parts.transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(**_pipe_args(parts, cfg))[0]
    assert ours.shape == (1, 48, 3, 4, 4)
    assert rel_err(ours, theirs) < TOL


@torch.no_grad()
def test_image_mode_equals_diffusers_image_to_video_pipeline(parts):
    from diffusers import WanImageToVideoPipeline

    from freeloc_dist.families.wan.token_timesteps import encode_first_frame
    from freeloc_dist.sampling import render, scheduler_for_render

    cfg = _cfg()
    pipe = WanImageToVideoPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                                   scheduler=scheduler_for_render(parts.scheduler, cfg.sampling.shift),
                                   transformer=parts.transformer, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    pil = _image()
    image = pipe.video_processor.preprocess(pil, height=64, width=64)  # [1, 3, 64, 64] in [-1, 1]: the entry's input
    ours = render(parts, cfg, decode=False, image=image).latents
    theirs = pipe(image=pil, **_pipe_args(parts, cfg))[0]
    assert rel_err(ours, theirs) < TOL
    # frame 0 is the clean encoded image, and the image changes the rest of the video
    assert torch.equal(ours[:, :, :1], encode_first_frame(parts.vae, image))
    text = render(parts, cfg, decode=False).latents
    assert rel_err(text[:, :, 1:], theirs[:, :, 1:]) > 1e-2


@torch.no_grad()
def test_image_mode_resume_equals_uninterrupted(parts, tmp_path):
    """A checkpoint after step 2 (saved and loaded through freeloc_dist.checkpoint) holds the scheduler's own
    latents, not the blended ones; resuming it in image mode gives the uninterrupted render bitwise."""
    from freeloc_dist.checkpoint import Checkpoint, load_checkpoint, save_checkpoint, scheduler_state
    from freeloc_dist.sampling import render

    cfg, image = _cfg(), torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    path = tmp_path / "c.ckpt"

    def after_step(step, latents, scheduler):
        if step == 2:
            save_checkpoint(path, Checkpoint(step=step, total_steps=cfg.sampling.steps, latents=latents,
                                             scheduler=scheduler_state(scheduler), rng=torch.get_rng_state(),
                                             fingerprint="f"))

    whole = render(parts, cfg, decode=False, image=image, after_step=after_step).latents
    resumed = render(parts, cfg, decode=False, image=image, resume=load_checkpoint(path, "f")).latents
    assert torch.equal(whole, resumed)


def test_image_of_the_wrong_size_or_model_is_refused(parts):
    from freeloc_dist.families.wan.tiny import build_tiny_components
    from freeloc_dist.sampling import render

    with pytest.raises(ValueError, match=r"conditioning image is \(32, 32\)"):
        render(parts, _cfg(steps=1), decode=False, image=torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="needs an expand_timesteps"):
        render(build_tiny_components(), _cfg(steps=1), decode=False, image=torch.zeros(1, 3, 64, 64))


def test_per_token_timesteps_are_frame_major():
    from freeloc_dist.families.wan.token_timesteps import token_timesteps

    text = token_timesteps(3, 4, 6, (1, 2, 2))
    assert torch.equal(text.timestep(torch.tensor(700.0)), torch.full((1, 3 * 2 * 3), 700.0))
    image = token_timesteps(3, 4, 6, (1, 2, 2), first_frame=torch.zeros(1, 48, 1, 4, 6))
    ts = image.timestep(torch.tensor(700.0))  # frame 0's 6 tokens first
    assert torch.equal(ts, torch.tensor([[0.0] * 6 + [700.0] * 12]))


@torch.no_grad()
def test_residual_vae_decode_equals_diffusers_and_splits_over_ranges(parts):
    """Our streaming decode (normalisation undone, the VAE's 2x2 patch unpatchified per chunk) against the
    VAE's own whole-video decode; a range that starts past the decoder's reach (decode_warmup_frames: 30
    latent frames) runs its warm-up from a later frame and still gives the frames of one pass, bitwise."""
    import numpy as np

    from freeloc_dist.decode import can_decode_ranges, decode_video, iter_decode
    from freeloc_dist.families.wan.vae import decode_warmup_frames, denormalise
    from freeloc_dist.video import to_uint8

    assert can_decode_ranges(parts.vae)
    short = torch.randn(1, 48, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    ours = decode_video(parts.vae, short)
    assert ours.shape == (9, 64, 64, 3)
    theirs = to_uint8(parts.vae.decode(denormalise(parts.vae, short), return_dict=False)[0])
    assert np.abs(ours.astype(int) - theirs.astype(int)).max() <= 1  # uint8 rounding of float32 noise
    frames = decode_warmup_frames(parts.vae) + 2  # the last frame's warm-up starts at latent frame 1
    z = torch.randn(1, 48, frames, 2, 2, generator=torch.Generator().manual_seed(0))
    whole = decode_video(parts.vae, z)
    last = np.concatenate(list(iter_decode(parts.vae, z, frames - 1, frames)))
    assert last.shape == (4, 32, 32, 3) and np.array_equal(last, whole[-4:])


def _model_5b(tmp_path, **index):
    root = tmp_path / "Wan2.2-TI2V-5B"
    for sub, data in (("transformer", TRANSFORMER_5B), ("vae", VAE_5B)):
        (root / sub).mkdir(parents=True)
        (root / sub / "config.json").write_text(json.dumps(data))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", "expand_timesteps": True,
                                                       **index}))
    return root


def test_planner_tokens_timestep_tables_and_parameters(tmp_path):
    from freeloc_dist.config import load_render_config
    from freeloc_dist.family import read_model_kind
    from freeloc_dist.planner import KNOWN_TRANSFORMERS, plan_render, transformer_params
    from freeloc_dist.profile import load_profile

    cfg = load_render_config(REPO_ROOT / "configs" / "wan2.2-ti2v-5b.yaml")
    assert (cfg.video.height, cfg.video.width) == (704, 1280)
    profile = load_profile(cfg.profile)
    kind = read_model_kind(_model_5b(tmp_path))
    plan = plan_render(cfg, TRANSFORMER_5B, profile, world_size=1, model_kind=kind)
    assert plan.tokens_per_frame == 880 == (704 // 32) * (1280 // 32)
    assert plan.tokens == 880 * cfg.latent_frames
    d = 24 * 128
    # per-token modulation: timestep_proj [L, 6 d] and temb [L, d] in bf16, one block's [L, 6 d] in float32
    assert plan.memory_bytes["timestep tables"] == plan.tokens * d * (7 * 2 + 6 * 4)
    assert 4.9e9 < transformer_params(TRANSFORMER_5B) < 5.1e9
    # without the model directory (published configs built in) the planner still knows the 16x VAE
    known = KNOWN_TRANSFORMERS["Wan-AI/Wan2.2-TI2V-5B-Diffusers"]
    assert all(known[k] == v for k, v in TRANSFORMER_5B.items() if k != "_class_name")
    assert plan_render(cfg, known, profile, world_size=1).tokens_per_frame == 880
    # a Wan2.1 model has no per-token tables
    t2v = plan_render(cfg, TRANSFORMER_5B, profile, world_size=1, model_kind=dataclasses.replace(
        kind, expand_timesteps=False, task="t2v"))
    assert "timestep tables" not in t2v.memory_bytes


def test_profiles_must_be_made_for_t_31(tmp_path):
    from freeloc_dist.cli import UserError
    from freeloc_dist.config import load_render_config
    from freeloc_dist.preflight import model_kind_checks
    from freeloc_dist.profile import load_profile

    root = _model_5b(tmp_path)
    cfg = load_render_config(REPO_ROOT / "configs" / "wan2.2-ti2v-5b.yaml", {"model.path": str(root)})
    kind, _ = model_kind_checks(cfg, root, load_profile(cfg.profile))
    assert (kind.task, kind.trained_frames, kind.num_layers) == ("ti2v", 31, 30)
    wan21 = REPO_ROOT / "configs" / "profiles" / "wan2.1-t2v-1.3b.yaml"  # also 30 layers, but T = 21
    with pytest.raises(UserError, match="trained_frames=21, but this ti2v model was trained on 31 latent frames"):
        model_kind_checks(dataclasses.replace(cfg, profile=wan21), root, load_profile(wan21))


def test_image_flag_drives_image_mode(parts, generate, tmp_path, monkeypatch):
    """`generate.py --image` on a TI2V model renders image mode: the saved latents equal the library's
    image-mode render of the same picture (fitted to the render size, [-1, 1]) and differ from text mode;
    a last image is refused (TI2V takes one picture, its first frame)."""
    from safetensors.torch import load_file

    from freeloc_dist.families.wan.conditioning import pixel_tensor
    from freeloc_dist.sampling import render

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    picture = tmp_path / "first.png"
    _image().resize((96, 64)).save(picture)  # another aspect: fitted (scaled and centre-cropped) to 64 x 64
    args = ["--config", str(REPO_ROOT / "configs" / "tiny-random-ti2v.yaml"), "--profile", "none", "--frames", "9",
            "--steps", "2", "--quiet"]
    latents = tmp_path / "image.safetensors"
    assert generate.main([*args, "--image", str(picture), "--out", str(tmp_path / "i.mp4"),
                          "--save-latents", str(latents)]) == 0
    from freeloc_dist.config import load_render_config
    from freeloc_dist.images import fit, load_image

    cfg = load_render_config(REPO_ROOT / "configs" / "tiny-random-ti2v.yaml", {"video.frames": 9, "sampling.steps": 2})
    image = pixel_tensor(fit(load_image(picture), 64, 64))
    ours = load_file(str(latents))["latents"]
    library = render(parts, cfg, decode=False, image=image).latents
    text = render(parts, cfg, decode=False).latents
    assert rel_err(ours, library) < 1e-6 and rel_err(ours, text) > 1e-2
    assert generate.main([*args, "--image", str(picture), "--last-image", str(picture),
                          "--out", str(tmp_path / "j.mp4")]) == 2
