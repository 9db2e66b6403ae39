"""The HunyuanVideo family (DESIGN 11; freeloc_dist.families.hunyuan_video): joint text-video FreeLOC attention
against a naive float64 reference at F > T for every layer kind and both text phases, the forced FreeLOC path
equal to diffusers' stock attention, the CLI render equal to diffusers' HunyuanVideoPipeline at F <= T, the VAE's
frame-range decode, the dry-run of the real config, and bad input refused with one line before weights load.
"""

import pytest
import torch
import yaml
from _cli import assert_refused, edited_config
from _hunyuan import hunyuan_transformer_inputs
from _joint import assert_sdpa_is_the_reference, freeloc_render, with_freeloc

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
TINY = REPO_ROOT / "assets" / "tiny-hunyuan"
TINY_PROFILE = REPO_ROOT / "configs" / "profiles" / "tiny-random-hunyuan.yaml"


@pytest.fixture(scope="module")
def parts():
    from freeloc_dist.models import load_components

    return load_components(TINY, "float32", "cpu")  # the production loader


# ---- the joint attention kernel against DESIGN 11, materialised ----------------------------------------------
def naive_joint(qv, kv, vv, qt, kt, vt, rotary, kind, grid, trained, text_phase, text_valid, tsa):
    """DESIGN 11 from the contract alone (token_plan, relative_positions), one float64 softmax over video + text:
    vv pairs by the layer's mask and offset; vt every valid text key; tv every video key; tt valid text keys.
    A video token of frame f meets text at phase f (natural) or phi(f) = relative_positions[f, 0] (phi)."""
    from freeloc_dist.plan import relative_positions, token_plan
    from freeloc_dist.rope import TemporalRope, apply_rotary

    t_rope = TemporalRope(t_dim=4, theta=256.0)
    mask, offset = token_plan(kind, grid, trained, tsa=tsa)
    num_frames, n = grid[0], grid[1] * grid[2]
    frame = torch.arange(num_frames).repeat_interleave(n)
    stock = num_frames <= trained or kind == "full"
    phase = frame if (text_phase == "natural" or stock) else relative_positions(num_frames, trained)[frame, 0]
    cos, sin = (x.double() for x in rotary)
    cos0, sin0 = cos.clone(), sin.clone()
    cos0[..., :4], sin0[..., :4] = 1.0, 0.0  # spatial rotation only: temporal position 0
    q0, k0 = (apply_rotary(x.double(), cos0, sin0)[0].transpose(0, 1) for x in (qv, kv))  # [h, Lv, d]
    qt_, kt_ = (x.double()[0].transpose(0, 1) for x in (qt, kt))
    values = torch.cat([vv, vt], 1).double()[0].transpose(0, 1)
    lv, lt = len(frame), qt.shape[1]
    score = torch.full((qv.shape[2], lv + lt, lv + lt), float("-inf"), dtype=torch.float64)
    scale = qv.shape[-1] ** -0.5
    for i in range(lv):
        for j in range(lv):
            if mask[i, j]:
                score[:, i, j] = (t_rope.rotate(q0[:, i], int(offset[i, j])) * k0[:, j]).sum(-1) * scale
        score[:, i, lv:] = (t_rope.rotate(q0[:, i], int(phase[i]))[:, None] @ kt_.transpose(-1, -2))[:, 0] * scale
    for j in range(lv):
        score[:, lv:, j] = (qt_ @ t_rope.rotate(k0[:, j], int(phase[j]))[:, :, None])[..., 0] * scale
    score[:, lv:, lv:] = qt_ @ kt_.transpose(-1, -2) * scale
    score[:, :, lv:] = score[:, :, lv:].masked_fill(~text_valid[0], float("-inf"))
    out = (torch.softmax(score, -1) @ values).transpose(0, 1)[None]  # [1, L, h, d]
    return out[:, :lv], out[:, lv:]


@pytest.mark.parametrize("text_phase", ["phi", "natural"])
@pytest.mark.parametrize("kind", ["tsa", "vrpr", "full"])
def test_joint_layer_equals_naive_float64_reference(parts, kind, text_phase):
    from freeloc_dist.attention.joint import JOINT
    from freeloc_dist.families import family_of
    from freeloc_dist.plan import layer_plan

    grid, trained = (7, 2, 2), 5  # F = 7 > T = 5: every kind out of distribution, d = 5, 6 past the stripes
    tsa = {"dense_frames": 2, "stripe_frames": 4, "stripe_width": 2, "sink_frames": [0]}
    g = torch.Generator().manual_seed(3)
    lv, lt, heads, d = 7 * 4, 5, 2, 16
    qv, kv, vv = (torch.randn(1, lv, heads, d, generator=g) for _ in range(3))
    qt, kt, vt = (torch.randn(1, lt, heads, d, generator=g) for _ in range(3))
    text_valid = torch.tensor([[True, True, True, False, True]])  # a padded text key in the middle
    family = family_of(parts.transformer)
    rotary = family.global_rope(parts.transformer, 7, 4, 4)  # the model's own RoPE: t/h/w = 4/6/6, theta 256
    want_v, want_t = naive_joint(qv, kv, vv, qt, kt, vt, rotary, kind, grid, trained, text_phase, text_valid, tsa)
    plan = layer_plan(kind, grid, trained, tsa=tsa)
    t_rope = family.temporal_rope(parts.transformer)
    for backend, tol in (("sdpa", 2e-5), ("sdpa-math", 2e-5), ("reference", 1e-12)):
        inputs = (qv, kv, vv, qt, kt, vt) if backend != "reference" else (
            x.double() for x in (qv, kv, vv, qt, kt, vt))
        out_v, out_t = JOINT[backend](*inputs, rotary, plan, t_rope, text_phase=text_phase, text_valid=text_valid)
        assert (out_v.double() - want_v).abs().max() < tol, (backend, (out_v.double() - want_v).abs().max())
        assert (out_t.double() - want_t).abs().max() < tol, (backend, (out_t.double() - want_t).abs().max())


def test_phi_text_phase_differs_from_natural_past_R():
    # the two settings must not coincide at F > T (else the test above could not tell them apart)
    from freeloc_dist.attention.joint import text_phases
    from freeloc_dist.plan import layer_plan

    plan = layer_plan("vrpr", (12, 1, 1), 5)
    phi, natural = text_phases(plan, "phi"), text_phases(plan, "natural")
    assert natural.tolist() == list(range(12)) and int(phi.max()) <= 4 and not torch.equal(phi, natural)


# ---- the processor inside the model -----------------------------------------------------------------------
def test_forced_freeloc_path_equals_stock_attention(parts):
    """With stock plans forced through FreeLOC's joint path (route_stock, as sequence parallelism forces it), every
    layer (dual- and single-stream) computes diffusers' joint attention: the adapter's projections, text
    handling and padded-key mask are the stock processor's."""
    model = parts.transformer
    inputs = hunyuan_transformer_inputs(frames=3)
    with torch.no_grad():
        stock = model(**inputs)[0]
    ours = with_freeloc(model, inputs, TINY_PROFILE, route_stock=True)
    assert (ours - stock).abs().max() < 1e-5


@pytest.mark.parametrize("text_phase", ["phi"])  # natural: the kernel tests above (suite time)
def test_model_at_F_gt_T_sdpa_equals_reference_backend(parts, text_phase, tmp_path):
    """Every layer kind of the tiny profile (tsa, vrpr, full; dual and single blocks) through the processor at
    F = 7 > T = 5: the sdpa backend equals the materialised float64 reference, and FreeLOC changed the output."""
    profile = {**yaml.safe_load(TINY_PROFILE.read_text()), "text_phase": text_phase}
    assert_sdpa_is_the_reference(parts.transformer, hunyuan_transformer_inputs(frames=7), profile)


def test_vae_frame_ranges_decode_exactly_diffusers_decode(parts):
    import numpy as np

    from freeloc_dist.families.hunyuan_video.vae import iter_decode
    from freeloc_dist.video import to_uint8

    vae = parts.vae
    z = torch.randn(1, 4, 5, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = to_uint8(vae.decode(z / vae.config.scaling_factor, return_dict=False)[0])  # tiled in time (F > 4)
    pieces = [np.concatenate(list(iter_decode(vae, z, s, e))) for s, e in ((0, 1), (1, 4), (4, 5))]
    assert want.shape[0] == 17 and np.array_equal(np.concatenate(pieces), want)


# ---- the CLI against diffusers' pipeline -------------------------------------------------------------------
def test_cli_render_equals_diffusers_pipeline(generate, parts, tmp_path, monkeypatch):
    """launch/generate.py with the tiny config at F <= T (stock), true CFG on (both passes, embedded guidance):
    its float32 latents equal HunyuanVideoPipeline's for the same prompt, seed and settings within 1e-4."""
    from diffusers import HunyuanVideoPipeline
    from safetensors.torch import load_file

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    latents = tmp_path / "lat.safetensors"
    argv = ["--config", str(REPO_ROOT / "configs" / "tiny-random-hunyuan.yaml"), "--frames", "5", "--steps", "2",
            "--true-cfg-scale", "1.5", "--negative-prompt", "blurry", "--out", str(tmp_path / "v.mp4"),
            "--save-latents", str(latents), "--quiet"]
    assert generate.main(argv) == 0
    ours = load_file(latents)["latents"]
    pipe = HunyuanVideoPipeline(text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                transformer=parts.transformer, vae=parts.vae,
                                scheduler=type(parts.scheduler).from_config(parts.scheduler.config),
                                text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt="a red fox running through fresh snow", negative_prompt="blurry", height=64, width=64,
                  num_frames=5, num_inference_steps=2, guidance_scale=6.0, true_cfg_scale=1.5,
                  generator=torch.Generator().manual_seed(0), output_type="latent", max_sequence_length=32).frames
    assert ours.shape == theirs.shape == (1, 4, 2, 8, 8)
    assert (ours - theirs).abs().max() < 1e-4


def test_dry_run_of_the_real_config_without_the_model(generate, capsys, monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert not (REPO_ROOT / "models" / "HunyuanVideo").exists()
    assert generate.main(["--config", str(REPO_ROOT / "configs" / "hunyuanvideo-t2v.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "33 latent frames x 3600 tokens" in out and "vrpr 60" in out
    assert "model: 60 attention layers; T = 33 latent frames" in out


def test_published_parameter_count():
    from freeloc_dist.families.hunyuan_video.counts import KNOWN_TRANSFORMERS, MODEL_ID, planner_config
    from freeloc_dist.planner import transformer_params

    assert round(transformer_params(planner_config(KNOWN_TRANSFORMERS[MODEL_ID])) / 1e9, 1) == 12.8


# ---- bad input: one line, exit 2, before weights load -------------------------------------------------------
def _profile(tmp_path, **changes):
    p = {**yaml.safe_load(TINY_PROFILE.read_text()), **changes}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(p))
    return ["--profile", str(path)]


def _storyboard(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("- {at: 0, prompt: a fox}\n- {at: 0.3, prompt: a bird, transition: 0}\n")
    return ["--storyboard", str(path)]


CASES = [
    ("profile-family", lambda t: _profile(t, family="wan"), "is a profile for the wan family, the model is hunyuan"),
    ("profile-layers", lambda t: ["--profile", str(REPO_ROOT / "configs/profiles/tiny-random.yaml")],
     "lists 3 layers"),
    ("profile-trained-frames", lambda t: _profile(t, trained_frames=9), "trained_frames=9, but this t2v model"),
    ("profile-text-phase", lambda t: _profile(t, text_phase="zero"), "text_phase='zero': must be one of phi"),
    ("cfg-degree-2-embedded", lambda t: ["--cfg-degree", "2"], "parallel.cfg_degree=2: HunyuanVideo embeds"),
    ("image-on-t2v", lambda t: ["--image", str(REPO_ROOT / "assets" / "i2v-first.png")], "is text-to-video"),
    ("flex-backend", lambda t: ["--backend", "flex"], "attention_backend=flex: joint text-video attention"),
    ("storyboard", lambda t: _storyboard(t), "has no per-frame text conditioning"),
]


@pytest.mark.parametrize("argv,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys, argv, needle):
    flags = ["--config", str(edited_config(tmp_path, "tiny-random-hunyuan.yaml")), *argv(tmp_path)]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle)


def test_true_cfg_scale_refused_on_wan(generate, tmp_path, monkeypatch, capsys):
    flags = ["--config", str(edited_config(tmp_path, "tiny-random.yaml")), "--true-cfg-scale", "2"]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, "sampling.true_cfg_scale=2: only guidance-embedded")


def test_enable_freeloc_on_the_stock_pipeline_equals_the_render(parts):
    """diffusers' HunyuanVideoPipeline with enable_freeloc at F = 7 > T (padded text and its mask reach the joint
    layers) equals the render loop's (padded text dropped before the blocks) within 1e-5."""
    from diffusers import HunyuanVideoPipeline

    from freeloc_dist import enable_freeloc
    from freeloc_dist.install import remove_freeloc

    cfg, ours = freeloc_render(parts, REPO_ROOT / "configs" / "tiny-random-hunyuan.yaml",
                               {"video.frames": 25, "video.height": 32, "video.width": 32, "sampling.steps": 1})
    pipe = HunyuanVideoPipeline(text_encoder=parts.text_encoder, tokenizer=parts.tokenizer,
                                transformer=parts.transformer, vae=parts.vae,
                                scheduler=type(parts.scheduler).from_config(parts.scheduler.config),
                                text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    enable_freeloc(pipe, cfg.profile)
    try:
        theirs = pipe(prompt=cfg.prompt, height=32, width=32, num_frames=25, num_inference_steps=1,
                      guidance_scale=6.0, generator=torch.Generator().manual_seed(0), output_type="latent",
                      max_sequence_length=32).frames
    finally:
        remove_freeloc(parts.transformer)
    assert ((theirs - ours).norm() / ours.norm()) < 1e-5


def test_enable_freeloc_at_trained_length_is_the_stock_pipeline():
    """At F = T every layer is stock: a stock HunyuanVideoPipeline with enable_freeloc returns bitwise what it
    returns without (true CFG 1.5, padded text)."""
    from _hunyuan import HUNYUAN_PROFILE, HUNYUAN_SHORT, render_hunyuan, tiny_hunyuan_pipeline

    from freeloc_dist import enable_freeloc

    pipe = tiny_hunyuan_pipeline()
    stock = render_hunyuan(pipe, HUNYUAN_SHORT)
    handle = enable_freeloc(pipe, HUNYUAN_PROFILE)
    assert torch.equal(render_hunyuan(pipe, HUNYUAN_SHORT), stock)
    handle.remove()
