"""The HunyuanVideo 1.5 family (DESIGN 11; freeloc_dist.families.hunyuan_video15): the CLI render equal to diffusers'
HunyuanVideo15Pipeline (text-to-video) and HunyuanVideo15ImageToVideoPipeline at F <= T, the joint attention
through the 1.5 adapter (forced FreeLOC path = stock attention with padded text; sdpa = the float64 reference at
F > T), the dry-run of the real configs, the planner's counts, and bad input refused with one line before weights
load. The joint kernel itself is tested against DESIGN 11 materialised in test_hunyuan.py (shared with v1).
"""

import pytest
import torch
import yaml
from _cli import assert_refused, edited_config
from _hunyuan import pipeline_args as _pipeline_args
from _hunyuan import tiny_pipeline15 as _tiny_pipeline
from _joint import assert_sdpa_is_the_reference, freeloc_render, with_freeloc

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
TINY = REPO_ROOT / "assets" / "tiny-hunyuan15"
TINY_I2V = REPO_ROOT / "assets" / "tiny-hunyuan15-i2v"
TINY_PROFILE = REPO_ROOT / "configs" / "profiles" / "tiny-random-hunyuan15.yaml"
GLYPH_PROMPT = 'a red fox running through fresh snow with a sign that says "hello"'  # quoted: ByT5 tokens too


@pytest.fixture(scope="module")
def parts():
    from freeloc_dist.models import load_components

    return load_components(TINY, "float32", "cpu")  # the production loader


@pytest.fixture(scope="module")
def i2v_parts():
    from freeloc_dist.models import load_components

    return load_components(TINY_I2V, "float32", "cpu")


def _no_world(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def _cli_latents(generate, tmp_path, config, *flags):
    from safetensors.torch import load_file

    latents = tmp_path / "lat.safetensors"
    argv = ["--config", str(REPO_ROOT / "configs" / config), "--frames", "9", "--steps", "2", "--height", "32",
            "--width", "32", "--prompt", GLYPH_PROMPT,
            "--negative-prompt", "blurry", "--out", str(tmp_path / "v.mp4"), "--save-latents", str(latents),
            "--quiet", *flags]
    assert generate.main(argv) == 0
    return load_file(latents)["latents"]


# ---- the CLI against diffusers' pipelines -------------------------------------------------------------------
def test_cli_render_equals_diffusers_pipeline(generate, parts, tmp_path, monkeypatch):
    """launch/generate.py with the tiny config at F = T = 3 latent frames (stock), classifier-free guidance on and
    a prompt with glyph text (Qwen and ByT5 tokens): its float32 latents equal HunyuanVideo15Pipeline's for the
    same prompt, seed and settings within 1e-4 (the pipeline pads Qwen to 1000 tokens and passes 729 masked
    image slots; the render drops both: rounding only)."""
    from diffusers import HunyuanVideo15Pipeline

    _no_world(monkeypatch)
    ours = _cli_latents(generate, tmp_path, "tiny-random-hunyuan15.yaml")
    pipe = _tiny_pipeline(HunyuanVideo15Pipeline(**_pipeline_args(parts)))
    theirs = pipe(prompt=GLYPH_PROMPT, negative_prompt="blurry", height=32, width=32, num_frames=9,
                  num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert ours.shape == theirs.shape == (1, 4, 3, 2, 2)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()


# ---- the VAE ------------------------------------------------------------------------------------------------
def test_streaming_decode_equals_diffusers_decode(parts):
    """The project's decode, one latent frame at a time (causal-conv inputs and attention keys/values carried
    over, no dense mask), equals diffusers' whole-video decode to float rounding: 1e-5 on outputs of size ~1.5."""
    from freeloc_dist.families.hunyuan_video15.vae import iter_decode, stream_decode

    vae = parts.vae
    z = torch.randn(1, 4, 3, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = vae.decode(z, return_dict=False)[0]
    chunks = list(stream_decode(vae, z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert (torch.cat(chunks, 2) - want).abs().max() < 1e-5
    assert sum(c.shape[0] for c in iter_decode(vae, z * vae.config.scaling_factor)) == 9


# ---- the joint attention through the 1.5 adapter ------------------------------------------------------------
def _transformer_inputs(parts, frames, seed=1):
    """Inputs as the pipeline passes them: padded Qwen text (the transformer moves valid tokens first and hands the
    joint layers a [B, Lt] key mask), no glyph text, and 5 masked zero image slots (text-to-video)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[1.0, 1, 1, 1, 0, 0]])
    return dict(hidden_states=torch.randn(1, 9, frames, 4, 4, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 6, 32, generator=g), encoder_attention_mask=mask,
                encoder_hidden_states_2=torch.randn(1, 3, 24, generator=g), encoder_attention_mask_2=torch.zeros(1, 3),
                image_embeds=torch.zeros(1, 5, 16), return_dict=False)


def test_forced_freeloc_path_equals_stock_attention(parts):
    """With stock plans forced through FreeLOC's joint path (route_stock, as sequence parallelism forces it), every
    dual-stream layer computes diffusers' 1.5 joint attention: the inherited projections, the text's [B, Lt] key
    mask (padded Qwen, ByT5 and image slots) and the output projections are the stock processor's."""
    model = parts.transformer
    inputs = _transformer_inputs(parts, frames=3)
    with torch.no_grad():
        stock = model(**inputs)[0]
    ours = with_freeloc(model, inputs, TINY_PROFILE, route_stock=True)
    assert (ours - stock).abs().max() < 1e-5, (ours - stock).abs().max()


def test_model_at_F_gt_T_sdpa_equals_reference_backend(parts):
    """Every layer kind of the tiny profile (tsa, vrpr, full) through the 1.5 processor at F = 7 > T = 3 with
    padded text: the sdpa backend equals the materialised float64 reference, and FreeLOC changed the output."""
    assert_sdpa_is_the_reference(parts.transformer, _transformer_inputs(parts, frames=7), TINY_PROFILE)


# ---- bad input: one line, exit 2, before weights load -------------------------------------------------------
def _profile(tmp_path, **changes):
    p = {**yaml.safe_load(TINY_PROFILE.read_text()), **changes}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(p))
    return ["--profile", str(path)]


CASES = [
    ("profile-family", lambda t: _profile(t, family="hunyuan_video"),
     "is a profile for the hunyuan_video family, the model is hunyuan_video15"),
    ("profile-layers", lambda t: _profile(t, family=None, layers={"tsa": [0], "vrpr": [1], "full": [2, 3]}),
     "lists 4 layers, the model at"),
    ("profile-trained-frames", lambda t: _profile(t, trained_frames=9), "trained_frames=9, but this t2v model"),
    ("image-on-t2v", lambda t: ["--image", str(REPO_ROOT / "assets" / "i2v-first.png")], "is text-to-video"),
    ("guidance-below-1", lambda t: ["--guidance-scale", "0.5"], "sampling.guidance_scale=0.5: below 1 is not"),
    ("true-cfg-scale", lambda t: ["--true-cfg-scale", "2"], "sampling.true_cfg_scale=2: HunyuanVideo 1.5 runs real"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys, argv, needle):
    flags = ["--config", str(edited_config(tmp_path, "tiny-random-hunyuan15.yaml")), *argv(tmp_path)]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle)


def _model_with_guider(tmp_path, **changes):
    """The tiny model's folders linked under tmp_path, its guider/config.json changed."""
    import json

    from freeloc_dist.families.hunyuan_video15.loading import GUIDER_CONFIG

    root = tmp_path / "model"
    root.mkdir()
    for entry in TINY.iterdir():
        if entry.name != "guider":
            (root / entry.name).symlink_to(entry)
    (root / "guider").mkdir()
    guider = json.loads((TINY / "guider" / GUIDER_CONFIG).read_text())
    (root / "guider" / GUIDER_CONFIG).write_text(json.dumps({**guider, **changes}))
    return root


@pytest.mark.parametrize("changes,needle", [
    ({"guidance_rescale": 0.7}, "guider/guider_config.json: guidance_rescale=0.7 is not applied by the render"),
    ({"stop": 0.5}, "guider/guider_config.json: stop=0.5 is not applied by the render"),
    ({"enabled": False}, "guider/guider_config.json: enabled=False is not applied by the render"),
    ({"_class_name": "AdaptiveProjectedGuidance"}, "'AdaptiveProjectedGuidance' is not supported"),
], ids=["rescale", "stop", "disabled", "class"])
def test_a_guider_the_render_does_not_apply_is_refused(generate, tmp_path, monkeypatch, capsys, changes, needle):
    """The stock pipeline applies its guider/; the render applies plain CFG on every step, so any other guider
    setting would be silently dropped: one line, exit 2, before weights load."""
    model = _model_with_guider(tmp_path, **changes)
    config = edited_config(tmp_path, "tiny-random-hunyuan15.yaml", lambda t, raw: raw["model"].update(path=str(model)))
    flags = ["--config", str(config)]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle)


def test_a_guider_config_that_is_not_an_object_is_refused(generate, tmp_path, monkeypatch, capsys):
    """Valid JSON that is not an object (was: AttributeError traceback, exit 1)."""
    model = _model_with_guider(tmp_path)
    (model / "guider" / "guider_config.json").write_text("[1, 2]")
    config = edited_config(tmp_path, "tiny-random-hunyuan15.yaml", lambda t, raw: raw["model"].update(path=str(model)))
    assert_refused(generate, ["--config", str(config)], tmp_path, monkeypatch, capsys,
                   "guider/guider_config.json: expected a JSON object, got list")


def test_the_shipped_guider_settings_are_accepted(tmp_path):
    from freeloc_dist.families.hunyuan_video15.loading import check_model_dir

    assert check_model_dir(_model_with_guider(tmp_path, use_original_formulation=True, guidance_scale=3.0))


def test_cli_image_to_video_equals_diffusers_pipeline(generate, i2v_parts, tmp_path, monkeypatch):
    """The image-to-video config at F = T (stock): the image fitted to 32 x 32 (the pipeline's bucket for it at
    the target size 32), its VAE latent and mask channels on frame 0 and its SigLIP tokens joined to the text;
    float32 latents equal HunyuanVideo15ImageToVideoPipeline's within 1e-4."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    from freeloc_dist.images import load_image

    _no_world(monkeypatch)
    parts = i2v_parts
    ours = _cli_latents(generate, tmp_path, "tiny-random-hunyuan15-i2v.yaml")
    pipe = _tiny_pipeline(HunyuanVideo15ImageToVideoPipeline(**_pipeline_args(parts), image_encoder=parts.image_encoder,
                                                             feature_extractor=parts.image_processor))
    theirs = pipe(image=load_image(REPO_ROOT / "assets" / "i2v-first.png"), prompt=GLYPH_PROMPT,
                  negative_prompt="blurry", num_frames=9, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="latent").frames
    assert ours.shape == theirs.shape == (1, 4, 3, 2, 2)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()


def test_enable_freeloc_on_the_stock_image_to_video_pipeline_equals_the_render(i2v_parts):
    """HunyuanVideo15ImageToVideoPipeline with enable_freeloc at F = 7 > T (the image's latent on frame 0, its
    SigLIP tokens and padded text in the joint layers, CFG with a negative prompt) equals the render loop's float32
    latents on the same weights within 1e-5 relative (measured 1.6e-6 against launch/generate.py)."""
    from _hunyuan import render_hunyuan15_i2v, tiny_hunyuan15_i2v_pipeline

    from freeloc_dist import enable_freeloc
    from freeloc_dist.install import remove_freeloc

    parts = i2v_parts
    _, ours = freeloc_render(parts, REPO_ROOT / "configs" / "tiny-random-hunyuan15-i2v.yaml",
                             {"video.frames": 25, "video.height": 32, "video.width": 32, "sampling.steps": 2,
                              "sampling.negative_prompt": "blurry"})
    pipe = tiny_hunyuan15_i2v_pipeline(parts)
    enable_freeloc(pipe, TINY_PROFILE)
    try:
        theirs = render_hunyuan15_i2v(pipe)
    finally:
        remove_freeloc(parts.transformer)
    assert ours.shape == theirs.shape == (1, 4, 7, 2, 2)
    assert ((theirs - ours).norm() / ours.norm()) < 1e-5, ((theirs - ours).norm() / ours.norm())


# ---- the real configs without the model, and the planner's counts ------------------------------------------
@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_dry_run_of_the_real_config_without_the_model(generate, capsys, monkeypatch, task):
    _no_world(monkeypatch)
    assert not (REPO_ROOT / "models" / f"HunyuanVideo-1.5-480p_{task}").exists()
    assert generate.main(["--config", str(REPO_ROOT / "configs" / f"hunyuanvideo1.5-{task}-480p.yaml"),
                          "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "31 latent frames x 1590 tokens" in out and "vrpr 54" in out  # 848 x 480 at 16x, patch 1: 53 x 30
    assert "model: 54 attention layers; T = 31 latent frames" in out


@pytest.mark.parametrize("change,needle", [
    ({"trained_frames": 33}, "trained_frames=33, but hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v was trained"),
    ({"family": "hunyuan_video"}, "is a profile for the hunyuan_video family, hunyuanvideo-community/HunyuanVideo-1.5"),
    ({"layers": {"vrpr": list(range(60)), "tsa": [], "full": []}}, "lists 60 layers, the model at"),
], ids=["T", "family", "layers"])
def test_dry_run_refuses_a_profile_that_does_not_fit(generate, tmp_path, monkeypatch, capsys, change, needle):
    profile = REPO_ROOT / "configs" / "profiles" / "hunyuanvideo1.5-t2v-480p.yaml"
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**yaml.safe_load(profile.read_text()), **change}))
    flags = ["--config", str(edited_config(tmp_path, "hunyuanvideo1.5-t2v-480p.yaml")), "--profile", str(path),
             "--dry-run"]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle)


def test_published_parameter_counts():
    """The transformer (meta-device build of the published config: 8.3 B), Qwen 2.5-VL-7B's language model from
    its published shape (7.07 B) plus ByT5's encoder."""
    from freeloc_dist.families.hunyuan_video15 import counts

    t = counts.planner_config(counts.KNOWN_TRANSFORMERS[counts.T2V_ID])
    assert t["num_layers"] == 54 and t["ffn_dim"] == 8192
    assert round(counts.transformer_params(t) / 1e9, 1) == 8.3
    qwen = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064)
    assert round((counts.text_encoder_params(qwen) - counts.BYT5_SMALL_ENCODER_PARAMS) / 1e9, 2) == 7.07
    assert counts.text_encoder_params(None) == counts.QWEN25_VL_7B_TEXT_PARAMS + counts.BYT5_SMALL_ENCODER_PARAMS


def test_planner_counts_siglip_for_image_to_video_only(i2v_parts):
    """The tiny I2V model's SigLIP counted from its config exactly (float32, resident like Wan's CLIP); the
    published so400m encoder's count (built on the meta device: 428,225,600); none for text-to-video. The
    one-off pixel buffer is the image's, not a video's."""
    import json

    from freeloc_dist.config import load_render_config
    from freeloc_dist.family import read_model_kind
    from freeloc_dist.planner import family_of_config, plan_render

    built = i2v_parts.image_encoder
    siglip = json.loads((TINY_I2V / "image_encoder" / "config.json").read_text())
    for model, name, want in ((TINY_I2V, "tiny-random-hunyuan15-i2v.yaml", sum(p.numel() for p in built.parameters())),
                              (TINY, "tiny-random-hunyuan15.yaml", None)):
        tcfg = json.loads((model / "transformer" / "config.json").read_text())
        plan = plan_render(load_render_config(REPO_ROOT / "configs" / name), tcfg, world_size=1,
                           model_kind=read_model_kind(model), image_encoder_cfg=siglip if want else None)
        assert plan.memory_bytes.get("weights: image encoder") == (want * 4 if want else None), name
        # the VAE encodes the image alone, not a pixel video (Wan's conditioning)
        assert plan.memory_bytes.get("conditioning video (once)") == (3 * 4 * 64 * 64 if want else None), name
    published = family_of_config({"_class_name": "HunyuanVideo15Transformer3DModel"})
    assert published.image_encoder_params({"_class_name": "HunyuanVideo15Transformer3DModel", "task_type": "i2v"},
                                          None) == 428_225_600


def test_text_encoder_count_is_the_built_models(parts):
    """The Qwen formula against the tiny Qwen's own parameters (grouped k/v, q/k/v biases, norms, embeddings)."""
    from freeloc_dist.families.hunyuan_video15 import counts

    config = parts.text_encoder.config.to_dict()
    built = sum(p.numel() for p in parts.text_encoder.parameters())
    assert counts.text_encoder_params(config) - counts.BYT5_SMALL_ENCODER_PARAMS == built


def test_text_and_video_flops():
    """Text costs FLOPs in every block (projections, MLP, its attention scores); image-to-video adds SigLIP's 729
    tokens to the text; with no text, the count is the video's linear layers alone."""
    from freeloc_dist.families.hunyuan_video15 import counts

    t2v, i2v = (counts.planner_config(counts.KNOWN_TRANSFORMERS[m]) for m in (counts.T2V_ID, counts.I2V_ID))
    video, d, layers = 1590, 2048, 54
    assert counts.linear_flops_per_pass(t2v, video, 0) == 2.0 * video * layers * (4 * d * d + 2 * d * 8192)
    assert counts.linear_flops_per_pass(t2v, video, 1000) > counts.linear_flops_per_pass(t2v, video, 0)
    assert counts.linear_flops_per_pass(i2v, video, 0) == counts.linear_flops_per_pass(t2v, video, 729)


def test_enable_freeloc_on_the_stock_pipeline_equals_the_render(parts):
    """diffusers' HunyuanVideo15Pipeline with enable_freeloc at F = 7 > T (padded Qwen and ByT5 text and 729 masked
    image slots reach the joint layers through their key mask) equals the render loop's (padding dropped before
    the blocks) within 1e-5 relative."""
    from diffusers import HunyuanVideo15Pipeline

    from freeloc_dist import enable_freeloc
    from freeloc_dist.install import remove_freeloc

    cfg, ours = freeloc_render(parts, REPO_ROOT / "configs" / "tiny-random-hunyuan15.yaml",
                               {"video.frames": 25, "video.height": 32, "video.width": 32, "sampling.steps": 1})
    pipe = _tiny_pipeline(HunyuanVideo15Pipeline(**_pipeline_args(parts)))
    enable_freeloc(pipe, cfg.profile)
    try:
        theirs = pipe(prompt=cfg.prompt, height=32, width=32, num_frames=25, num_inference_steps=1,
                      generator=torch.Generator().manual_seed(0), output_type="latent").frames
    finally:
        remove_freeloc(parts.transformer)
    assert ((theirs - ours).norm() / ours.norm()) < 1e-5, ((theirs - ours).norm() / ours.norm())
