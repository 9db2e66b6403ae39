"""Probing image-conditioned models (Wan2.1 I2V and FLF2V, Wan2.2 I2V-A14B, Wan2.2 TI2V-5B in image mode) on the
tiny models: the probe's trajectories are the render's own (same conditioning channels, CLIP tokens, per-token
timesteps and clean first frame), its probe forwards see what the sampler's transformer calls see, and
launch/probe.py takes --image / --last-image with the render's checks.

Tolerances: the trajectory and the forward run the same float32 math as a render but through the probe's
attention processor (its own SDPA call and rotary application, not diffusers' dispatch), so they agree to
rounding: within 1e-5 relative (measured <= 1e-6); a missing conditioning is O(1) off or crashes."""

import pytest
import torch
import yaml
from _cli import assert_refused, edited_config
from _scripts import load_script
from _tiny import rel_err

from freeloc_dist.config import REPO_ROOT, load_render_config

pytestmark = pytest.mark.unit
FIRST, LAST = REPO_ROOT / "assets" / "i2v-first.png", REPO_ROOT / "assets" / "i2v-last.jpg"
TRAINED = 5  # the tiny profiles' T (latent frames): 17 video frames


def _probe_script():
    return load_script("launch/probe.py")


def _render_and_probe_trajectory(config: str, overrides: dict, record: list[int]):
    """(render latents after each recorded step, probe trajectory inputs, loaded parts, cfg) at F = T."""
    from freeloc_dist.experts import expert_schedule
    from freeloc_dist.models import load_components
    from freeloc_dist.probing import Prober, trajectory_inputs
    from freeloc_dist.probing.run import _conditioning
    from freeloc_dist.sampling import (
        encode_prompt,
        initial_noise,
        latent_geometry,
        predict_noise,
        render,
        scheduler_for_render,
    )

    frames = 4 * (TRAINED - 1) + 1
    cfg = load_render_config(REPO_ROOT / "configs" / f"{config}.yaml", {"video.frames": frames, **overrides})
    parts = load_components(cfg.model.path, "float32", "cpu")
    seen = {0: initial_noise(latent_geometry(parts.vae, parts.transformer, frames, cfg.video.height,
                                             cfg.video.width), cfg.sampling.seed, "cpu")}
    render(parts, cfg, decode=False, after_step=lambda step, latents, _s: seen.__setitem__(step, latents.clone()))

    s = cfg.sampling
    geometry = latent_geometry(parts.vae, parts.transformer, frames, cfg.video.height, cfg.video.width)
    conditioning = _conditioning(parts, cfg, geometry, frames, "cpu", torch.float32)
    cond = encode_prompt(parts, cfg.prompt, s.max_text_tokens)
    uncond = encode_prompt(parts, s.negative_prompt, s.max_text_tokens)
    schedule = expert_schedule(parts, parts.scheduler, s.guidance_scale, s.guidance_scale_2, predict_noise)
    probers = [Prober(t, trained_frames=TRAINED, layers=[]) for t in parts.experts()]
    for p in probers:
        p.__enter__()
    try:
        inputs = trajectory_inputs(parts.transformer, scheduler_for_render(parts.scheduler, s.shift),
                                   initial_noise(geometry, s.seed, "cpu"), cond, uncond, steps=s.steps,
                                   guidance=s.guidance_scale, record=record, experts=schedule, **conditioning)
    finally:
        for p in probers:
            p.__exit__(None, None, None)
    return [seen[i] for i in record], inputs, parts, cfg


CASES = [
    ("tiny-random-i2v", {}),  # CLIP tokens + mask/conditioning channels
    ("tiny-random-flf2v", {}),  # first and last frame
    ("tiny-random-i2v-a14b", {}),  # two experts, no CLIP
    ("tiny-random-ti2v", {"image": str(FIRST)}),  # per-token timesteps, clean first frame
]


@pytest.mark.parametrize("config, overrides", CASES, ids=[c for c, _ in CASES])
def test_probe_trajectory_and_forward_are_the_renders(config, overrides):
    from freeloc_dist.probing import Prober
    from freeloc_dist.sampling import predict_noise

    record = [0, 2, 3]
    rendered, inputs, parts, cfg = _render_and_probe_trajectory(config, overrides, record)
    kind = "token_timesteps" if config.endswith("ti2v") else "condition"
    assert all(getattr(inp, kind) is not None for inp in inputs)
    for step, got, want in zip(record, inputs, rendered):
        assert got.latents.shape == want.shape
        assert rel_err(got.latents, want) < 1e-5, (config, step, rel_err(got.latents, want))
    assert rel_err(inputs[-1].latents, inputs[0].latents) > 1e-2  # the steps moved the latents

    # The probe's own forward (stock-equivalent at T) is the sampler's conditional transformer call.
    inp = inputs[-1]
    x, t = inp.latents, inp.timestep
    if inp.token_timesteps is not None:
        x, t = inp.token_timesteps.model_input(x), inp.token_timesteps.timestep(t)
    with torch.inference_mode():
        want = predict_noise(parts.transformer, x, t, inp.text, None, 1.0, condition=inp.condition)
    with Prober(parts.transformer, trained_frames=TRAINED) as prober:
        got = prober._forward(inp)
    assert rel_err(got.float(), want) < 1e-5, rel_err(got.float(), want)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """launch/probe.py's main and a cheap probe settings file (one prompt, two points, 16 query rows)."""
    tmp = tmp_path_factory.mktemp("probe_conditioned")
    settings = tmp / "probing.yaml"
    settings.write_text(yaml.safe_dump({"prompts": ["a cat"], "timesteps": [0.0, 0.5], "steps": 4,
                                        "query_samples": 16, "measure_output": True}))
    return _probe_script(), settings


def _probed(probe, tmp_path, config, *flags):
    script, settings = probe
    out = tmp_path / f"p{len(list(tmp_path.glob('p*.yaml')))}.yaml"
    assert script.main(["--config", str(REPO_ROOT / "configs" / config), "--probe-config", str(settings),
                        "--frames", "33", "--out", str(out), *flags]) == 0
    profile = yaml.safe_load(out.read_text())
    assert sorted(i for layers in profile["layers"].values() for i in layers) == [0, 1, 2]
    rows = [row for row in profile["scores"].values() if isinstance(row, list)]
    rows += [r for by in profile["scores"].values() if isinstance(by, dict) for r in by.values()]
    assert len(rows) == 14 and all(len(r) == 3 and all(abs(v) < float("inf") for v in r) for r in rows), rows
    return profile


def test_i2v_probe_is_conditioned_on_the_image(probe, tmp_path):
    first = _probed(probe, tmp_path, "tiny-random-i2v.yaml")
    other = _probed(probe, tmp_path, "tiny-random-i2v.yaml", "--image", str(LAST))
    assert first["settings"]["image"] == "assets/i2v-first.png"
    assert other["settings"]["image"] == "assets/i2v-last.jpg"
    assert first["scores"] != other["scores"]  # the image reaches the trajectories and the probe forwards


def test_ti2v_probes_text_and_image_mode(probe, tmp_path):
    text = _probed(probe, tmp_path, "tiny-random-ti2v.yaml")
    image = _probed(probe, tmp_path, "tiny-random-ti2v.yaml", "--image", str(FIRST))
    assert "image" not in text["settings"] and image["settings"]["image"] == "assets/i2v-first.png"
    assert text["scores"] != image["scores"]


def test_i2v_a14b_probes_each_expert_with_the_image(probe, tmp_path):
    high = _probed(probe, tmp_path, "tiny-random-i2v-a14b.yaml", "--expert", "transformer")
    low = _probed(probe, tmp_path, "tiny-random-i2v-a14b.yaml", "--expert", "transformer_2")
    # 4 steps at shift 3: timesteps 999, 959 >= 900 (boundary 0.9) run the first expert, 900 ... the second
    assert high["settings"]["expert_steps"][0] == 0 and low["settings"]["expert_steps"][1] == 4
    assert high["settings"]["expert_steps"][1] == low["settings"]["expert_steps"][0]
    assert high["settings"]["image"] == low["settings"]["image"] == "assets/i2v-first.png"
    assert high["scores"] != low["scores"]


def _no_image(_tmp, raw):
    raw.pop("image")


def _missing_image(tmp, raw):
    raw["image"] = str(tmp / "gone.png")


@pytest.mark.parametrize("config, edit, flags, needle", [
    ("tiny-random-i2v.yaml", _no_image, [], "is image-to-video (WanImageToVideoPipeline"),
    ("tiny-random-i2v.yaml", _missing_image, [], "gone.png': file not found"),
    ("tiny-random-flf2v.yaml", None, ["--last-image", "nope.jpg"], "nope.jpg': file not found"),
    ("tiny-random.yaml", None, ["--image", str(FIRST)], "is text-to-video (WanPipeline); it takes no image"),
    ("tiny-random-i2v.yaml", None, ["--last-image", str(LAST)], "is not a first-last-frame model"),
], ids=["i2v-without-image", "missing-image", "missing-last-image", "t2v-with-image", "last-image-not-flf2v"])
def test_bad_image_input_is_refused_before_loading(probe, tmp_path, monkeypatch, capsys, config, edit, flags,
                                                   needle):
    script, settings = probe
    path = edited_config(tmp_path, config, edit)
    assert_refused(script, ["--config", str(path), "--probe-config", str(settings), "--frames", "33",
                            "--out", str(tmp_path / "out" / "p.yaml"), *flags], tmp_path, monkeypatch, capsys,
                   needle)


def test_flf2v_probe_keeps_the_conditioning_sinks(tmp_path, monkeypatch):
    """The base profile leaves tsa.sink_frames unset, so a first-last-frame render puts TSA's sinks on the first
    and the last latent frame; the probed profile must leave it unset too: with the base's layer kinds it
    renders exactly as the base profile (it wrote `sink_frames: [0]`, dropping the last-frame sink: 6.7e-3 off
    here)."""
    from freeloc_dist.install import apply_freeloc
    from freeloc_dist.models import load_components
    from freeloc_dist.profile import load_profile
    from freeloc_dist.sampling import render

    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    settings = tmp_path / "probing.yaml"
    settings.write_text(yaml.safe_dump({"prompts": ["a cat"], "timesteps": [0.0], "steps": 1, "query_samples": 8,
                                        "measure_output": False}))
    config = REPO_ROOT / "configs" / "tiny-random-flf2v.yaml"
    out = tmp_path / "p.yaml"
    assert _probe_script().main(["--config", str(config), "--probe-config", str(settings), "--frames", "33",
                                 "--height", "32", "--width", "32", "--out", str(out)]) == 0
    base_path = REPO_ROOT / "configs" / "profiles" / "tiny-random-i2v.yaml"
    probed = {**yaml.safe_load(out.read_text()), "layers": yaml.safe_load(base_path.read_text())["layers"]}

    cfg = load_render_config(config, {"sampling.steps": 1, "video.height": 32, "video.width": 32})
    parts = load_components(cfg.model.path, "float32", "cpu")
    latents, sinks = [], []
    for profile in (base_path, probed):
        apply_freeloc(parts.transformer, profile)
        latents.append(render(parts, cfg, decode=False).latents)
        sinks.append(parts.transformer.freeloc_state.profile.tsa.sink_frames)
    assert rel_err(latents[1], latents[0]) == 0, rel_err(latents[1], latents[0])
    assert sinks == [(0, 8), (0, 8)]  # 33 frames: 9 latent frames
    assert not load_profile(out).tsa_sinks_given and load_profile(out).tsa == load_profile(base_path).tsa
