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
from _loras import make_loras, merged
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


# ---------------------------------------------------------------------------------------- guidance 1
def test_guidance_1_runs_half_the_transformer_calls(generate, parts, tmp_path, monkeypatch, capsys):
    """--guidance-scale 1 (a distilled LoRA's setting) skips the unconditional pass: one transformer call per step
    instead of two, and equals WanPipeline at guidance 1 (which skips it too)."""
    import freeloc_dist.models as models

    calls = []
    load = models.load_components

    def counted(*args, **kwargs):
        loaded = load(*args, **kwargs)
        loaded.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
        return loaded

    monkeypatch.setattr(models, "load_components", counted)
    ours, _ = cli_latents(generate, tmp_path, monkeypatch, capsys, "--guidance-scale", "1")
    without_cfg, calls[:] = len(calls), []
    from freeloc_dist.sampling import render

    hook = parts.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:  # the same render at the config's guidance 5, through the CLI's sampler
        render(parts, render_config(), decode=False)
    finally:
        hook.remove()
    assert (len(calls), without_cfg) == (6, 3)  # 3 steps
    assert rel_err(ours, stock_latents(stock_pipeline(parts), guidance_scale=1.0)) < 1e-4


def test_guidance_1_with_cfg_degree_2_is_one_line_exit_2(generate, tmp_path, monkeypatch, capsys):
    """cfg_degree 2 puts the unconditional pass on its own ranks: with no such pass it is refused, not run idle."""
    from _cli import assert_refused

    assert_refused(generate, ["--config", str(write_config(tmp_path)), "--guidance-scale", "1", "--cfg-degree", "2",
                              "--validate-only", "--world-size", "2"], tmp_path, monkeypatch, capsys,
                   "parallel.cfg_degree=2: needs sampling.guidance_scale > 1")


# ---------------------------------------------------------------------------------------- LoRAs
SCALES = (0.7, 1.3)


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    return make_loras(tmp_path_factory.mktemp("loras"))


def lora_flags(loras, scales=SCALES):
    return ["--lora", f"{loras[0]}:{scales[0]}", "--lora", f"{loras[1]}:{scales[1]}"]


def test_lora_through_the_cli_equals_the_stock_pipeline_with_it_merged(generate, parts, loras, tmp_path,
                                                                        monkeypatch, capsys):
    """F <= T: two LoRAs (diffusers' format with metadata, the original Wan format) at two scales, fused."""
    ours, sidecar = cli_latents(generate, tmp_path, monkeypatch, capsys, *lora_flags(loras))
    pipe = stock_pipeline(parts, transformer=merged(parts.transformer, loras[2], SCALES))
    theirs = stock_latents(pipe)
    assert rel_err(ours, theirs) < 1e-4
    assert rel_err(stock_latents(stock_pipeline(parts)), theirs) > 1e-2  # the LoRAs matter at this size
    assert [(x["scale"], x["experts"]) for x in sidecar["loras"]] == [(0.7, ["transformer"]), (1.3, ["transformer"])]
    assert sidecar["loras"][0]["sha256"] != sidecar["loras"][1]["sha256"]


def test_lora_through_the_cli_equals_diffusers_load_lora_weights(generate, parts, loras, tmp_path, monkeypatch,
                                                                 capsys):
    """The same render against diffusers' own loader (peft: not a locked dependency, so skipped without it)."""
    pytest.importorskip("peft")
    import copy

    ours, _ = cli_latents(generate, tmp_path, monkeypatch, capsys, *lora_flags(loras))
    pipe = stock_pipeline(parts, transformer=copy.deepcopy(parts.transformer))
    pipe.load_lora_weights(str(loras[0]), adapter_name="style")
    pipe.load_lora_weights(str(loras[1]), adapter_name="distill")
    pipe.set_adapters(["style", "distill"], adapter_weights=list(SCALES))
    assert rel_err(ours, stock_latents(pipe)) < 1e-4


def test_unfused_lora_at_f_above_t_keeps_freeloc(generate, parts, loras, tmp_path, monkeypatch, capsys):
    """F > T (25 frames = 7 latent frames, T = 5), LoRAs kept unfused: the CLI equals our sampler on the merged
    model with FreeLOC installed, and differs from the merged model with stock attention."""
    import dataclasses

    from freeloc_dist.install import apply_freeloc
    from freeloc_dist.profile import load_profile
    from freeloc_dist.sampling import render

    ours, _ = cli_latents(generate, tmp_path, monkeypatch, capsys, *lora_flags(loras), "--no-fuse-loras",
                          "--frames", "25")
    cfg = render_config()
    cfg = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, frames=25))
    model = merged(parts.transformer, loras[2], SCALES)
    with_lora = dataclasses.replace(parts, transformer=model)
    stock = render(with_lora, cfg, decode=False).latents
    apply_freeloc(model, load_profile(cfg.profile))
    freeloc = render(with_lora, cfg, decode=False).latents
    assert rel_err(ours, freeloc) < 1e-4
    assert rel_err(ours, stock) > 1e-3


def test_lora_experts_of_a_two_expert_model(loras):
    """expert low: transformer_2 only; both: each; unset: the first transformer (diffusers' default)."""
    from freeloc_dist.config import LoraConfig, ModelConfig
    from freeloc_dist.family import model_family, read_model_kind
    from freeloc_dist.loras import apply_loras, read_loras
    from freeloc_dist.models import load_components

    root = REPO_ROOT / "assets" / "tiny-a14b"
    q = "blocks.0.attn1.to_q.weight"
    for expert, changed in ((None, (True, False)), ("low", (False, True)), ("both", (True, True))):
        model_cfg = ModelConfig(path=root, loras=(LoraConfig(path=loras[0], expert=expert),))
        read = read_loras(model_cfg, model_family(root), root, read_model_kind(root))
        parts = load_components(root, "float32")
        before = [t.state_dict()[q].clone() for t in parts.experts()]
        apply_loras(parts, read)
        assert tuple(not torch.equal(b, t.state_dict()[q]) for b, t in zip(before, parts.experts())) == changed


def test_changed_lora_is_refused_on_resume(generate, loras, tmp_path, monkeypatch, capsys):
    """A checkpoint of a render with a LoRA: the same LoRA resumes (--validate-only stops before sampling); other
    content at the same path, or another scale, is one line, exit 2."""
    import shutil

    from _cli import assert_refused

    from freeloc_dist.checkpoint import Checkpoint, checkpoint_path, fingerprint, fingerprint_settings, save_checkpoint
    from freeloc_dist.preflight import latent_shape, load_config, load_profile_of

    lora = tmp_path / "l.safetensors"
    shutil.copy(loras[0], lora)
    cfg_path = write_config(tmp_path)
    overrides = {"video.frames": 9, "video.height": 32, "video.width": 32, "sampling.steps": 3,
                 "checkpoint.path": str(tmp_path / "ck"), "model.loras": [{"path": str(lora), "scale": 0.7}]}
    cfg = load_config(cfg_path, overrides, None)
    profile = load_profile_of(cfg)
    save_checkpoint(checkpoint_path(cfg), Checkpoint(
        step=1, total_steps=3, latents=torch.zeros(latent_shape(cfg)), scheduler={}, rng=torch.get_rng_state(),
        fingerprint=fingerprint(cfg, profile), settings=fingerprint_settings(cfg, profile)))
    argv = ["--config", str(cfg_path), "--frames", "9", "--height", "32", "--width", "32", "--steps", "3",
            "--checkpoint", "ck", "--resume", "--validate-only"]
    monkeypatch.chdir(tmp_path)
    assert generate.main([*argv, "--lora", f"{lora}:0.7"]) == 0, capsys.readouterr().err
    assert_refused(generate, [*argv, "--lora", f"{lora}:0.8"], tmp_path, monkeypatch, capsys,
                   "written by a different render (loras differ)")
    shutil.copy(loras[1], lora)
    assert_refused(generate, [*argv, "--lora", f"{lora}:0.7"], tmp_path, monkeypatch, capsys,
                   "written by a different render (loras differ)")


def test_renders_without_the_new_settings_keep_their_fingerprint():
    """Checkpoints written before LoRAs and schedulers could be chosen still resume: a render with neither has
    the settings it had."""
    from freeloc_dist.checkpoint import fingerprint_settings

    settings = fingerprint_settings(render_config(), None)
    assert "loras" not in settings and "sampling.scheduler" not in settings
    assert "sampling.scheduler" in fingerprint_settings(render_config(scheduler="euler"), None)


def _garbage(t):
    (t / "g.safetensors").write_bytes(b"not a tensor file at all")
    return t / "g.safetensors"


def _lora_file(t, tensors, name="x.safetensors"):
    from safetensors.torch import save_file

    save_file(tensors, t / name)
    return t / name


@pytest.mark.parametrize("make, flag, needle", [
    (lambda t: t / "nope.safetensors", "", "LoRA file not found"),
    (lambda t: t, "", "is a directory; give the LoRA file"),
    (_garbage, "", "not a LoRA file diffusers reads"),
    (lambda t: _lora_file(t, {"transformer.blocks.0.attn1.to_q.weight": torch.zeros(24, 24)}), "",
     "not a LoRA (transformer.blocks.0.attn1.to_q.weight is not a LoRA weight)"),
    (lambda t: _lora_file(t, {"text_encoder.x.lora_A.weight": torch.zeros(2, 4)}), "",
     "holds no LoRA weights for the transformer"),
    (lambda t: _lora_file(t, {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 40),
                              "transformer.blocks.0.attn1.to_q.lora_B.weight": torch.zeros(40, 2)}), "",
     "not a LoRA for this model: blocks.0.attn1.to_q is [24, 24] in transformer, the LoRA's update is [40, 40]"),
    (lambda t: _lora_file(t, {"transformer.blocks.7.attn1.to_q.lora_A.weight": torch.zeros(2, 24),
                              "transformer.blocks.7.attn1.to_q.lora_B.weight": torch.zeros(24, 2)}), "",
     "it updates blocks.7.attn1.to_q, which is not a linear layer of transformer"),
    (lambda t: _lora_file(t, {"transformer.blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 24)}), "",
     "blocks.0.attn1.to_q: needs lora_A [r, in] and lora_B [out, r]"),
    (lambda t: t / "x.safetensors", ":nan", "model.loras[0].scale=nan: must be a number in [-100, 100]"),
    (lambda t: t / "x.safetensors", ":abc", "'abc' is neither a scale nor an expert"),
    (lambda t: t / "x.safetensors", ":low", "model.loras[0].expert='low': the model at"),
])
def test_bad_lora_is_one_line_exit_2(generate, loras, tmp_path, monkeypatch, capsys, make, flag, needle):
    import shutil

    from _cli import assert_refused

    shutil.copy(loras[0], tmp_path / "x.safetensors")
    path = make(tmp_path)
    assert_refused(generate, ["--config", str(write_config(tmp_path)), *SMALL, "--lora", f"{path}{flag}"],
                   tmp_path, monkeypatch, capsys, needle)


@pytest.mark.parametrize("edit, needle", [
    (lambda raw: raw["model"].update(loras=[{"path": "x.safetensors"}]), "model.loras: launch/probe.py probes"),
    (lambda raw: raw["sampling"].update(scheduler="euler"), "sampling.scheduler: launch/probe.py probes"),
    (lambda raw: raw.update(cache={"name": "first_block"}), "cache: launch/probe.py probes"),  # was: ignored
])
def test_probing_refuses_what_it_does_not_apply(tmp_path, monkeypatch, capsys, edit, needle):
    """launch/probe.py loads the model as shipped: a config with LoRAs or another scheduler is one line, exit 2."""
    from _scripts import load_script

    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    code = load_script("launch/probe.py").main(["--config", str(write_config(tmp_path, edit)), "--frames", "33",
                                                 "--out", str(tmp_path / "p.yaml")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.parametrize("config, flags, said", [
    ("wan2.1-t2v-1.3b.yaml", ["--guidance-scale", "1"], True),  # the config ships a negative prompt
    ("wan2.1-t2v-1.3b.yaml", [], False),
    ("hunyuanvideo-t2v.yaml", ["--negative-prompt", "blurry"], True),  # embedded guidance: no uncond pass
    ("hunyuanvideo-t2v.yaml", ["--negative-prompt", "blurry", "--true-cfg-scale", "1.5"], False),
    ("hunyuanvideo-t2v.yaml", [], False),  # no negative prompt
])
def test_an_unused_negative_prompt_is_said(generate, capsys, monkeypatch, config, flags, said):
    """Guidance settings that run no unconditional pass leave the negative prompt unused: one warning (the
    dry-run's preflight is the render's)."""
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert generate.main(["--config", str(REPO_ROOT / "configs" / config), "--dry-run", *flags]) == 0
    captured = capsys.readouterr()
    assert ("warning: sampling.negative_prompt is not used" in captured.out + captured.err) == said
