"""The speed levers of the CLI (README "Fast sampling"): sampling.scheduler, guidance 1 (no unconditional pass)
and LoRAs (model.loras), each through launch/generate.py in this process against diffusers' own WanPipeline on
the shipped tiny model (assets/tiny-wan, float32) at F <= T, where FreeLOC runs stock attention.

1e-4 relative on the final latents: the same float32 math in another order (our loop vs the pipeline's), a few
steps; the other tests in the suite that compare with WanPipeline use the same bound.
"""

import json

import pytest
import torch
import yaml
from _tiny import rel_err
from safetensors.torch import load_file

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
TINY = REPO_ROOT / "assets" / "tiny-wan"
# F <= T: 9 frames = 3 latent frames, the tiny model's T is 5
SMALL = ["--frames", "9", "--height", "32", "--width", "32", "--steps", "3", "--seed", "7"]


def write_config(tmp_path, edit=None):
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())
    raw["output"] = str(tmp_path / "out" / "v.mp4")
    raw["sampling"]["negative_prompt"] = "blurry"
    if edit is not None:
        edit(raw)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli_latents(generate, tmp_path, monkeypatch, capsys, *argv):
    """Final latents of one in-process CLI render (outside torchrun), and its sidecar."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    code = generate.main(["--config", str(write_config(tmp_path)), *SMALL, "--save-latents", "lat.safetensors",
                          *map(str, argv)])
    assert code == 0, capsys.readouterr().err
    sidecar = json.loads((tmp_path / "out" / "v.json").read_text())
    return load_file(tmp_path / "lat.safetensors")["latents"], sidecar


@pytest.fixture(scope="module")
def parts():
    """The tiny model's components, loaded once through the CLI's own loader (float32)."""
    from freeloc_dist.models import load_components

    return load_components(TINY, "float32")


def stock_pipeline(parts, **changes):
    """diffusers' WanPipeline over the same components (`changes` replaces some, e.g. scheduler=...)."""
    from diffusers import WanPipeline

    components = dict(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                      scheduler=parts.scheduler, transformer=parts.transformer)
    pipe = WanPipeline(**{**components, **changes})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_config(**sampling):
    """The config of SMALL, for renders through freeloc_dist.sampling.render (the CLI's sampler) in this process."""
    from freeloc_dist.config import parse_render_config

    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-random.yaml").read_text())
    raw["video"].update(frames=9, height=32, width=32)
    raw["sampling"].update(steps=3, seed=7, negative_prompt="blurry", **sampling)
    return parse_render_config(raw)


@torch.no_grad()
def stock_latents(pipe, guidance_scale=5.0):
    """WanPipeline's final latents for SMALL with the same prompt embeddings and initial noise as the CLI."""
    from freeloc_dist.sampling import encode_prompt, initial_noise, latent_geometry

    cfg = render_config()
    tokens = cfg.sampling.max_text_tokens
    geometry = latent_geometry(pipe.vae, pipe.transformer, 9, 32, 32)
    return pipe(prompt_embeds=encode_prompt(pipe, cfg.prompt, tokens),
                negative_prompt_embeds=encode_prompt(pipe, "blurry", tokens),
                latents=initial_noise(geometry, 7, "cpu"), height=32, width=32, num_frames=9,
                num_inference_steps=3, guidance_scale=guidance_scale, output_type="latent", return_dict=False)[0]


# ---------------------------------------------------------------------------------------- schedulers
def _as_a_diffusers_user_sets_it(scheduler, name):
    """The scheduler a diffusers user sets on a Wan pipeline for each choice, with the flow shift of the config."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    config = scheduler.config
    if name == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=3.0)
    if name in ("model", "unipc"):  # the tiny model's own is UniPC with flow sigmas
        return UniPCMultistepScheduler.from_config(config, flow_shift=3.0)
    return DPMSolverMultistepScheduler.from_config(config, flow_shift=3.0, use_flow_sigmas=True,
                                                   prediction_type="flow_prediction", algorithm_type="dpmsolver++")


@pytest.mark.parametrize("name", ["model", "euler", "unipc", "dpm++"])
def test_scheduler_choice_equals_the_stock_pipeline_with_that_scheduler(parts, name):
    from freeloc_dist.sampling import render

    ours = render(parts, render_config(scheduler=name), decode=False).latents
    pipe = stock_pipeline(parts, scheduler=_as_a_diffusers_user_sets_it(parts.scheduler, name))
    assert rel_err(ours, stock_latents(pipe)) < 1e-4


def test_scheduler_through_the_cli(generate, parts, tmp_path, monkeypatch, capsys):
    """--scheduler reaches the render (a multistep sampler other than the model's) and the sidecar names it."""
    ours, sidecar = cli_latents(generate, tmp_path, monkeypatch, capsys, "--scheduler", "dpm++")
    pipe = stock_pipeline(parts, scheduler=_as_a_diffusers_user_sets_it(parts.scheduler, "dpm++"))
    assert rel_err(ours, stock_latents(pipe)) < 1e-4
    assert sidecar["scheduler"] == "DPMSolverMultistepScheduler"
    assert sidecar["config"]["sampling"]["scheduler"] == "dpm++"
def test_unknown_scheduler_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys):
    from _cli import assert_refused

    cfg = str(write_config(tmp_path))
    assert_refused(generate, ["--config", cfg, "--scheduler", "ddim"], tmp_path, monkeypatch, capsys,
                   "--scheduler: invalid choice: 'ddim'")
    cfg = str(write_config(tmp_path, lambda raw: raw["sampling"].update(scheduler="ddim")))
    assert_refused(generate, ["--config", cfg], tmp_path, monkeypatch, capsys,
                   "sampling.scheduler='ddim': must be one of: model, euler, unipc, dpm++")
