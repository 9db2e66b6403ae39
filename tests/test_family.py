"""The Wan family: model kind from the directory, profile/model fit, and Wan2.2-T2V-A14B's two experts
against diffusers' own WanPipeline on the tiny two-expert model (F <= T, float32, latents within 1e-4).

1e-4 relative: the same float32 math in another order (our loop vs the pipeline's), a few steps.
"""

import dataclasses
import json
import shutil

import pytest
import torch
from _tiny import rel_err

from freeloc_dist.config import REPO_ROOT
from freeloc_dist.family import ModelKindError, check_profile_fits, read_model_kind
from freeloc_dist.profile import load_profile

pytestmark = pytest.mark.unit
ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_kinds_of_the_committed_models():
    t2v = read_model_kind(ROOT / "assets" / "tiny-wan")
    assert (t2v.task, t2v.experts, t2v.boundary_ratio, t2v.trained_frames) == ("t2v", ("transformer",), None, 5)
    a14b = read_model_kind(ROOT / "assets" / "tiny-a14b")
    assert a14b.experts == ("transformer", "transformer_2") and a14b.boundary_ratio == 0.875
    assert (a14b.vae_spatial, a14b.vae_temporal, a14b.latent_channels) == (8, 4, 4)


def _copy(tmp_path, name="tiny-a14b"):
    out = tmp_path / name
    shutil.copytree(ROOT / "assets" / name, out)
    return out


def _edit(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("where, changes, message", [
    ("model_index.json", {"boundary_ratio": None}, "transformer_2 and boundary_ratio come together"),
    ("model_index.json", {"boundary_ratio": 1.5}, "must be in (0, 1)"),
    ("model_index.json", {"_class_name": "FluxPipeline"}, "expected WanPipeline"),
    ("transformer/config.json", {"in_channels": 36}, "in_channels=36: expected 4 (text-to-video) or 12"),
    ("transformer/config.json", {"in_channels": 12}, "WanPipeline with an image-to-video transformer"),
    ("transformer/config.json", {"in_channels": 5, "out_channels": 5}, "out_channels=5, but the VAE's z_dim is 4"),
    ("transformer_2/config.json", {"num_layers": 2}, "transformer_2/config.json: num_layers=2 differs"),
    ("transformer/config.json", {"image_dim": 32}, "no image_encoder/"),
])
def test_configs_that_disagree_are_one_line_errors(tmp_path, where, changes, message):
    model = _copy(tmp_path)
    _edit(model / where, **changes)
    with pytest.raises(ModelKindError) as info:
        read_model_kind(model)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_profile_must_fit_layers_and_trained_frames():
    kind = read_model_kind(ROOT / "assets" / "tiny-a14b")
    prof = load_profile(ROOT / "configs" / "profiles" / "tiny-random.yaml")
    check_profile_fits(kind, prof, "p")
    with pytest.raises(ModelKindError, match="trained_frames=5, but this t2v model was trained on 21"):
        check_profile_fits(dataclasses.replace(kind, trained_frames=21), prof, "p")
    with pytest.raises(ModelKindError, match="lists 3 layers, the model has 4"):
        check_profile_fits(dataclasses.replace(kind, num_layers=4), prof, "p")


def test_family_trained_frames_without_a_declared_one(tmp_path):
    model = _copy(tmp_path, "tiny-wan")
    (model / "freeloc.json").unlink()
    assert read_model_kind(model).trained_frames == 21
    _edit(model / "model_index.json", expand_timesteps=True)
    assert read_model_kind(model).trained_frames == 31


def test_trained_frames_of_directories_written_before_freeloc_json(tmp_path):
    """A model directory written before freeloc.json declared T in model_index.json: still read (and freeloc.json,
    where both are, wins)."""
    model = _copy(tmp_path, "tiny-wan")
    (model / "freeloc.json").unlink()
    _edit(model / "model_index.json", trained_frames=7)
    assert read_model_kind(model).trained_frames == 7
    (model / "freeloc.json").write_text(json.dumps({"trained_frames": 5}))
    assert read_model_kind(model).trained_frames == 5
    (model / "freeloc.json").write_text(json.dumps({"trained_frames": "5"}))
    with pytest.raises(ModelKindError, match="freeloc.json: trained_frames='5': must be a positive integer"):
        read_model_kind(model)


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-a14b", "tiny-i2v", "tiny-flf2v", "tiny-i2v-a14b", "tiny-ti2v",
                                  "toy-wan"])
def test_shipped_assets_load_in_diffusers_without_warnings(name, caplog):
    """diffusers warns about every model_index.json key its pipeline does not take, on every from_pretrained;
    the shipped directories carry none (T is in freeloc.json)."""
    import diffusers
    from diffusers.utils import logging as diffusers_logging

    root = ROOT / "assets" / name
    pipeline = getattr(diffusers, json.loads((root / "model_index.json").read_text())["_class_name"])
    diffusers_logging.enable_propagation()
    try:
        with caplog.at_level("WARNING", logger="diffusers"):
            pipeline.from_pretrained(root, local_files_only=True)
    finally:
        diffusers_logging.disable_propagation()
    assert "not expected" not in caplog.text and "trained_frames" not in caplog.text, caplog.text


@torch.no_grad()
@pytest.mark.parametrize("guidance_2", [2.5, 1.0, 0.5, 0.0])
def test_two_experts_equal_diffusers_wan_pipeline(guidance_2):
    """Wan2.2-T2V-A14B's expert switch and guidance_scale_2: our loop vs WanPipeline, same model and noise.
    A second scale <= 1 still combines both passes (the first scale decides that the unconditional one runs)."""
    from diffusers import WanPipeline

    from freeloc_dist.config import parse_render_config
    from freeloc_dist.families.wan.tiny import build_tiny_a14b_components
    from freeloc_dist.sampling import encode_prompt, initial_noise, latent_geometry, render, scheduler_for_render

    parts = build_tiny_a14b_components(seed=0)
    cfg = parse_render_config({
        "model": {"path": "unused", "dtype": "float32"}, "video": {"height": 32, "width": 32, "frames": 17},
        "sampling": {"steps": 4, "guidance_scale": 4.0, "guidance_scale_2": guidance_2, "shift": 3.0, "seed": 3,
                     "max_text_tokens": 16, "negative_prompt": "blurry"},
        "prompt": "a fox"})
    ours = render(parts, cfg, decode=False).latents
    s = cfg.sampling
    scheduler = scheduler_for_render(parts.scheduler, s.shift)
    scheduler.set_timesteps(s.steps)
    below = [float(t) < 875 for t in scheduler.timesteps]
    assert any(below) and not all(below), scheduler.timesteps  # both experts run
    pipe = WanPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                       scheduler=scheduler_for_render(parts.scheduler, s.shift), transformer=parts.transformer,
                       transformer_2=parts.transformer_2, boundary_ratio=parts.boundary_ratio)
    pipe.set_progress_bar_config(disable=True)
    geometry = latent_geometry(parts.vae, parts.transformer, 17, 32, 32)
    theirs = pipe(prompt_embeds=encode_prompt(parts, cfg.prompt, 16),
                  negative_prompt_embeds=encode_prompt(parts, s.negative_prompt, 16),
                  latents=initial_noise(geometry, s.seed, "cpu"), height=32, width=32, num_frames=17,
                  num_inference_steps=s.steps, guidance_scale=s.guidance_scale, guidance_scale_2=s.guidance_scale_2,
                  output_type="latent", return_dict=False)[0]
    assert rel_err(ours, theirs) < 1e-4
    # the parallel engine's predict decides the unconditional pass by the same rule (one process, world 1:
    # the cfg_degree 2 branch keys on the same decision)
    from freeloc_dist.parallel import parallelize
    from freeloc_dist.parallel.dims import ParallelDims

    dims = ParallelDims(1, 0, 1, 1, torch.device("cpu"), None)
    engine = parallelize(parts.transformer, dims)
    engine_2 = parallelize(parts.transformer_2, dims, comm=engine.comm)
    try:
        parallel = render(parts, cfg, decode=False, predict=engine.predict, predict_2=engine_2.predict).latents
    finally:
        engine.remove(), engine_2.remove()
    assert rel_err(parallel, theirs) < 1e-4
    if guidance_2 != 2.5:
        return
    # and the second expert matters: the first alone is far off
    alone = render(dataclasses.replace(parts, transformer_2=None, boundary_ratio=None), cfg, decode=False).latents
    assert rel_err(alone, theirs) > 1e-2


def test_planner_counts_both_experts_and_the_real_vae_factor():
    from freeloc_dist.config import load_render_config
    from freeloc_dist.planner import plan_render

    cfg = load_render_config(ROOT / "configs" / "tiny-random-a14b.yaml", {"memory.experts": "resident"})
    tcfg = json.loads((ROOT / "assets" / "tiny-a14b" / "transformer" / "config.json").read_text())
    kind = read_model_kind(ROOT / "assets" / "tiny-a14b")
    one = plan_render(cfg, tcfg, world_size=1)
    two = plan_render(cfg, tcfg, world_size=1, model_kind=kind)
    assert two.memory_bytes["weights: transformer_2"] == one.memory_bytes["weights: transformer"] > 0
    assert "weights: transformer_2" not in one.memory_bytes
    sixteen = plan_render(cfg, tcfg, world_size=1, model_kind=dataclasses.replace(kind, vae_spatial=16))
    assert sixteen.tokens_per_frame * 4 == two.tokens_per_frame


def test_fingerprint_covers_the_second_expert():
    from freeloc_dist.checkpoint import fingerprint
    from freeloc_dist.config import load_render_config

    cfg = load_render_config(ROOT / "configs" / "tiny-random-a14b.yaml")
    p1 = load_profile(ROOT / "configs" / "profiles" / "tiny-random.yaml")
    p2 = load_profile(ROOT / "configs" / "profiles" / "tiny-random-2.yaml")
    base = fingerprint(cfg, p1, profile_2=p2, boundary_ratio=0.875)
    assert base != fingerprint(cfg, p1, profile_2=p1, boundary_ratio=0.875)
    assert base != fingerprint(cfg, p1, profile_2=p2, boundary_ratio=0.9)
    assert fingerprint(cfg, p1) == fingerprint(cfg, p1, profile_2=p2)  # no boundary: one expert, unchanged


@pytest.mark.parametrize("config", ["wan2.2-t2v-a14b.yaml", "wan2.2-i2v-a14b.yaml"])
def test_a14b_dry_run_without_the_model_directory_counts_both_experts(generate, capsys, config):
    """A published two-expert model plans from the built-in configs (planner.KNOWN_KINDS) before its weights
    are downloaded: both experts resident, the same shape (offloaded by default: the second in host memory)."""
    assert generate.main(["--config", str(REPO_ROOT / "configs" / config), "--dry-run", "--world-size", "8",
                          "--experts", "resident"]) == 0
    out = capsys.readouterr().out
    first = [line for line in out.splitlines() if "weights: transformer " in line]
    second = [line for line in out.splitlines() if "weights: transformer_2" in line]
    assert len(first) == len(second) == 1 and first[0].split()[-2:] == second[0].split()[-2:]
    assert generate.main(["--config", str(REPO_ROOT / "configs" / config), "--dry-run", "--world-size", "8"]) == 0
    out = capsys.readouterr().out
    assert "weights: transformer_2" not in out
    assert f"idle expert (transformer_2) {first[0].split()[-2]} GiB" in out
