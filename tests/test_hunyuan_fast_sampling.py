"""The speed levers of the CLI (README "Fast sampling") on the two HunyuanVideo families: LoRAs (model.loras)
through launch/generate.py in this process against diffusers' own loaders on the stock pipelines at F <= T
(where FreeLOC runs stock attention), fused and unfused; bad LoRAs refused in one line before loading; the
resume fingerprint; and which sampling.scheduler / cache choices run or are refused.

Models: the shipped tiny assets (assets/tiny-hunyuan, assets/tiny-hunyuan15), float32. 1e-4 on the final
latents (max abs): the same float32 math in another order (our loop vs the pipeline's; diffusers' LoRA is peft's
layer beside the weight, ours fused in float32 or a hook), 2 steps; test_hunyuan*.py compare the plain renders
with the same bound.
"""

import copy
import dataclasses
import json

import pytest
import torch
from _cli import assert_refused, edited_config
from _hunyuan import pipeline_args, tiny_pipeline15
from _loras import HUNYUAN15_LAYERS as V15_LAYERS
from _loras import make_hunyuan15_lora, make_hunyuan_loras, random_updates, save_diffusers_lora
from safetensors.torch import load_file

from freeloc_dist.config import REPO_ROOT

pytestmark = pytest.mark.unit
V1, V15 = REPO_ROOT / "assets" / "tiny-hunyuan", REPO_ROOT / "assets" / "tiny-hunyuan15"
CONFIGS = {V1: "tiny-random-hunyuan.yaml", V15: "tiny-random-hunyuan15.yaml"}
# F <= T: v1 5 frames = 2 latent frames (T = 5) with true CFG (both passes); 1.5 9 frames = 3 latent (T = 3)
FLAGS = {V1: ["--frames", "5", "--true-cfg-scale", "1.5", "--negative-prompt", "blurry"],
         V15: ["--frames", "9", "--negative-prompt", "blurry"]}
PROMPT = "a red fox running through fresh snow"  # the configs'
SCALES = (0.7, 1.3)


def _no_world(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)


def cli_latents(generate, model, tmp_path, monkeypatch, *flags, edit=None):
    """Final latents of one in-process CLI render of the model's tiny config (`edit(tmp_path, raw)` applied)."""
    _no_world(monkeypatch)
    latents = tmp_path / "lat.safetensors"
    argv = ["--config", str(edited_config(tmp_path, CONFIGS[model], edit)), *FLAGS[model], "--steps", "2",
            "--height", "32", "--width", "32", "--out", str(tmp_path / "v.mp4"), "--save-latents", str(latents),
            "--quiet", *map(str, flags)]
    assert generate.main(argv) == 0
    return load_file(latents)["latents"]


@pytest.fixture(scope="module")
def v1_parts():
    from freeloc_dist.models import load_components

    return load_components(V1, "float32", "cpu")


@pytest.fixture(scope="module")
def v15_parts():
    from freeloc_dist.models import load_components

    return load_components(V15, "float32", "cpu")


def shapes_of(model):
    from freeloc_dist.family import model_family

    return model_family(model).transformer_shapes(model, "transformer")


def v1_pipeline(parts, **changes):
    """diffusers' HunyuanVideoPipeline over the production loader's components (a copy of the transformer, which
    a LoRA may change), `changes` replacing some."""
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**{**dict(
        text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, transformer=copy.deepcopy(parts.transformer),
        vae=parts.vae, scheduler=type(parts.scheduler).from_config(parts.scheduler.config),
        text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2), **changes})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def v1_latents(pipe, steps=2, true_cfg_scale=1.5):
    """The stock pipeline's final latents with the CLI's v1 settings (configs/tiny-random-hunyuan.yaml + FLAGS)."""
    return pipe(prompt=PROMPT, negative_prompt="blurry", height=32, width=32, num_frames=5, num_inference_steps=steps,
                guidance_scale=6.0, true_cfg_scale=true_cfg_scale, generator=torch.Generator().manual_seed(0),
                output_type="latent", max_sequence_length=32).frames


def v15_pipeline(parts):
    from diffusers import HunyuanVideo15Pipeline

    return tiny_pipeline15(HunyuanVideo15Pipeline(**pipeline_args(
        dataclasses.replace(parts, transformer=copy.deepcopy(parts.transformer)))))


@torch.no_grad()
def v15_latents(pipe, steps=2):
    return pipe(prompt=PROMPT, negative_prompt="blurry", height=32, width=32, num_frames=9,
                num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="latent").frames


# ---------------------------------------------------------------------------------------- LoRA files
# HunyuanVideo: tests/_loras.py's make_hunyuan_loras (diffusers' format on every kind of layer; the original format).
# HunyuanVideo 1.5: tests/_loras.py's make_hunyuan15_lora (rank 2, alpha 6: scaling 3).


@pytest.fixture(scope="module")
def v1_loras(tmp_path_factory):
    return make_hunyuan_loras(tmp_path_factory.mktemp("v1-loras"))


@pytest.fixture(scope="module")
def v15_lora(tmp_path_factory):
    return make_hunyuan15_lora(tmp_path_factory.mktemp("v15-lora"))


# ---------------------------------------------------------------------------------------- LoRAs vs diffusers
@pytest.fixture(scope="module")
def v1_stock(v1_parts, v1_loras):
    """HunyuanVideoPipeline's latents with the two LoRAs at SCALES (load_lora_weights + set_adapters), and
    without them."""
    pipe = v1_pipeline(v1_parts)
    pipe.load_lora_weights(str(v1_loras[0]), adapter_name="style")
    pipe.load_lora_weights(str(v1_loras[1]), adapter_name="original")
    pipe.set_adapters(["style", "original"], adapter_weights=list(SCALES))
    return v1_latents(pipe), v1_latents(v1_pipeline(v1_parts))


@pytest.fixture(scope="module")
def v15_stock(v15_parts, v15_lora):
    """HunyuanVideo15Pipeline's latents with the LoRA at SCALES[0], loaded by its transformer's load_lora_adapter
    (the pipeline has no load_lora_weights; use_safetensors=True: without it diffusers reads a file path as a
    plain state dict and drops the adapter metadata, alpha, which no pipeline loader does), and without it."""
    pipe = v15_pipeline(v15_parts)
    pipe.transformer.load_lora_adapter(str(v15_lora), adapter_name="style", use_safetensors=True)
    pipe.transformer.set_adapters(["style"], weights=[SCALES[0]])
    return v15_latents(pipe), v15_latents(v15_pipeline(v15_parts))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_v1_loras_through_the_cli_equal_load_lora_weights(generate, v1_loras, v1_stock, tmp_path, monkeypatch,
                                                         fuse):
    """Two LoRAs (diffusers' format with metadata and biases; the original HunyuanVideo format, converted by
    diffusers) at two scales equal HunyuanVideoPipeline.load_lora_weights + set_adapters."""
    ours = cli_latents(generate, V1, tmp_path, monkeypatch, "--lora", f"{v1_loras[0]}:{SCALES[0]}",
                       "--lora", f"{v1_loras[1]}:{SCALES[1]}", *([] if fuse else ["--no-fuse-loras"]))
    theirs, without = v1_stock
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
    assert (without - theirs).abs().max() > 1e-2  # the LoRAs matter at this size


def test_v1_unfused_loras_at_f_above_t_equal_fused(v1_parts, v1_loras):
    """F > T (7 latent frames, T = 5: FreeLOC's processors in every joint layer, dual- and single-stream): the
    LoRAs kept unfused (forward hooks on the projections the processors call) give the transformer's output with
    them fused into the weights (1e-5 relative: float32 rounding of one call, outputs ~20), and they change it."""
    from _hunyuan import HUNYUAN_PROFILE, hunyuan_transformer_inputs
    from _joint import with_freeloc
    from _tiny import rel_err

    from freeloc_dist.config import LoraConfig, ModelConfig
    from freeloc_dist.family import model_family, read_model_kind
    from freeloc_dist.loras import apply_loras, read_loras

    specs = tuple(LoraConfig(path=path, scale=scale) for path, scale in zip(v1_loras, SCALES))
    loras = read_loras(ModelConfig(path=V1, loras=specs), model_family(V1), V1, read_model_kind(V1))
    inputs = hunyuan_transformer_inputs(frames=7)
    outputs = []
    for fuse in (True, False, None):
        parts = dataclasses.replace(v1_parts, transformer=copy.deepcopy(v1_parts.transformer))
        if fuse is not None:
            apply_loras(parts, loras, fuse=fuse)
        outputs.append(with_freeloc(parts.transformer, inputs, HUNYUAN_PROFILE))
    fused, unfused, without = outputs
    assert rel_err(unfused, fused) < 1e-5, rel_err(unfused, fused)
    assert rel_err(without, fused) > 1e-2


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_v15_lora_through_the_cli_equals_load_lora_adapter(generate, v15_lora, v15_stock, tmp_path, monkeypatch,
                                                           fuse):
    """A LoRA in diffusers' format at scale 0.7 equals the stock HunyuanVideo15Pipeline with it (v15_stock)."""
    ours = cli_latents(generate, V15, tmp_path, monkeypatch, "--lora", f"{v15_lora}:{SCALES[0]}",
                       *([] if fuse else ["--no-fuse-loras"]))
    theirs, without = v15_stock
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
    assert (without - theirs).abs().max() > 1e-2


def test_v15_lora_saved_by_save_lora_adapter_reads_alike(v15_lora, tmp_path):
    """The transformer's save_lora_adapter writes the keys and metadata unprefixed (load_lora_adapter(prefix=None)
    reads them): the same LoRA in that layout gives the same updates and scalings."""
    from freeloc_dist.family import model_family
    from freeloc_dist.loras import read_lora

    family = model_family(V15)
    unprefixed = save_diffusers_lora(tmp_path / "u.safetensors",
                                     random_updates(shapes_of(V15), V15_LAYERS, 2, 3), alpha=6, prefix="")
    want, got = read_lora(family, v15_lora, "a"), read_lora(family, unprefixed, "b")
    assert sorted(got) == sorted(want) == sorted(V15_LAYERS)
    for layer, u in got.items():
        assert torch.equal(u.down, want[layer].down) and torch.equal(u.up, want[layer].up)
        assert u.scaling == want[layer].scaling == 3.0


# ---------------------------------------------------------------------------------------- schedulers and caches
def test_v1_scheduler_and_cache_equal_the_stock_pipeline(generate, v1_parts, tmp_path, monkeypatch):
    """UniPC and FirstBlockCache (threshold 0.9: most calls skipped) with true CFG, 4 steps, equal
    HunyuanVideoPipeline with that scheduler and cache: each pass keeps its own cache state, as the pipeline's
    cache contexts "cond" / "uncond" do (the two texts differ in length here: shared state would not even run)."""
    from diffusers import FirstBlockCacheConfig, UniPCMultistepScheduler

    ours = cli_latents(generate, V1, tmp_path, monkeypatch, "--steps", 4, "--scheduler", "unipc", "--cache",
                       "first_block", "--cache-threshold", 0.9)
    assert json.loads((tmp_path / "v.json").read_text())["cache"]["skipped"] > 0
    unipc = UniPCMultistepScheduler.from_config(v1_parts.scheduler.config, prediction_type="flow_prediction",
                                                use_flow_sigmas=True, flow_shift=7.0)
    pipe = v1_pipeline(v1_parts, scheduler=unipc)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.9))
    theirs = v1_latents(pipe, steps=4)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()


def test_v15_taylorseer_equals_the_stock_pipeline(generate, v15_parts, tmp_path, monkeypatch):
    """TaylorSeer (its factors in float32: in bfloat16 their rounding turns the two loops' float32 differences
    into ~1e-3) over 6 steps with CFG equals HunyuanVideo15Pipeline with it, and changes the output."""
    from diffusers import TaylorSeerCacheConfig

    ours = cli_latents(generate, V15, tmp_path, monkeypatch, "--steps", 6,
                       edit=lambda t, raw: raw.update(cache={"name": "taylorseer", "taylor_factors_dtype": "float32"}))
    pipe = v15_pipeline(v15_parts)
    pipe.transformer.enable_cache(TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32))
    theirs = v15_latents(pipe, steps=6)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
    assert (v15_latents(v15_pipeline(v15_parts), steps=6) - theirs).abs().max() > 1e-2


def test_v15_unipc_equals_the_stock_pipeline(generate, v15_parts, tmp_path, monkeypatch):
    """UniPC (integer timesteps: the render gives the model float ones, as the 1.5 pipeline casts them) over 4 steps
    with CFG equals HunyuanVideo15Pipeline with it, and differs from the model's own Euler."""
    from diffusers import UniPCMultistepScheduler

    ours = cli_latents(generate, V15, tmp_path, monkeypatch, "--steps", 4, "--scheduler", "unipc")
    pipe = v15_pipeline(v15_parts)
    pipe.scheduler = UniPCMultistepScheduler.from_config(v15_parts.scheduler.config, prediction_type="flow_prediction",
                                                         use_flow_sigmas=True, flow_shift=5.0)
    theirs = v15_latents(pipe, steps=4)
    assert (ours - theirs).abs().max() < 1e-4, (ours - theirs).abs().max()
    assert (v15_latents(v15_pipeline(v15_parts), steps=4) - theirs).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------- refused before loading
def _conv_lora(t):
    return save_diffusers_lora(t / "conv.safetensors", {"x_embedder.proj": (torch.zeros(2, 4), torch.zeros(32, 2),
                                                                             None)})


def _nan_lora(t, v1):
    """The v1 diffusers-format LoRA with one NaN in one layer's lora_A."""
    from safetensors.torch import save_file

    state = load_file(v1[0])
    key = "transformer.proj_out.lora_A.weight"
    state[key][0, 0] = float("nan")
    save_file(state, t / "nan.safetensors")
    return t / "nan.safetensors"


def _lora_with_text_encoder(t, v15):
    """The 1.5 LoRA with a text encoder layer's LoRA added (diffusers' loaders drop it silently)."""
    from safetensors.torch import save_file

    state = load_file(v15)
    state |= {"text_encoder.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 16),
              "text_encoder.layers.0.mlp.up_proj.lora_B.weight": torch.zeros(16, 2)}
    save_file(state, t / "with_te.safetensors")
    return t / "with_te.safetensors"


REFUSED = [
    ("v15-lora-on-v1", V1, lambda t, v1, v15: ["--lora", v15], "style.safetensors': not a LoRA for this model: "),
    ("v1-lora-on-v15", V15, lambda t, v1, v15: ["--lora", v1[0]], "style.safetensors': not a LoRA for this model: "),
    ("original-format-on-v15", V15, lambda t, v1, v15: ["--lora", v1[1]],
     "not in diffusers' LoRA format (diffusion_model."),
    ("conv-layer", V1, lambda t, v1, v15: ["--lora", _conv_lora(t)],
     "it updates x_embedder.proj, which is not a linear layer"),
    ("expert-on-v1", V1, lambda t, v1, v15: ["--lora", f"{v1[0]}:1:high"], "model.loras[0].expert='high': the model"),
    ("expert-on-v15", V15, lambda t, v1, v15: ["--lora", f"{v15}:1:both"], "model.loras[0].expert='both': the model"),
    ("nan-lora", V1, lambda t, v1, v15: ["--lora", _nan_lora(t, v1)],
     "nan.safetensors': proj_out.lora_A.weight holds NaN or infinite values"),
    ("text-encoder-keys", V15, lambda t, v1, v15: ["--lora", _lora_with_text_encoder(t, v15)],
     "also holds LoRA weights of another component (text_encoder.layers.0.mlp.up_proj.lora_A.weight)"),
    ("unipc-repeated-timesteps", V1, lambda *_: ["--scheduler", "unipc", "--steps", "150"],
     "sampling.steps=150: UniPCMultistepScheduler repeats a timestep at this many steps (shift 7)"),
    ("compile-on-v1", V1, lambda *_: ["--compile", "blocks"],
     "model.compile=blocks: not built for HunyuanVideo with a FreeLOC profile yet"),
    ("compile-on-v15", V15, lambda *_: ["--compile", "blocks"],
     "model.compile=blocks: not built for HunyuanVideo 1.5 with a FreeLOC profile yet"),
    ("dpm++-on-v1", V1, lambda *_: ["--scheduler", "dpm++"],
     "sampling.scheduler=dpm++: not for HunyuanVideo: DPMSolverMultistepScheduler takes no custom sigmas"),
    ("first-block-on-v15", V15, lambda *_: ["--cache", "first_block"],
     "cache.name=first_block: not for HunyuanVideo 1.5: diffusers has no block registration"),
    ("pab-with-true-cfg", V1, lambda *_: ["--cache", "pyramid_attention_broadcast", "--true-cfg-scale", "1.5"],
     "cache.name=pyramid_attention_broadcast: not with HunyuanVideo's classifier-free guidance"),
]


@pytest.mark.parametrize("model, make, needle", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_exit_2(generate, v1_loras, v15_lora, tmp_path, monkeypatch, capsys, model, make,
                                    needle):
    """Refused in preflight (one line, exit 2, nothing written), before any weight loads."""
    import freeloc_dist.models as models

    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("loaded weights"))
    flags = ["--config", str(edited_config(tmp_path, CONFIGS[model])), *map(str, make(tmp_path, v1_loras, v15_lora))]
    assert_refused(generate, flags, tmp_path, monkeypatch, capsys, needle)


def test_changed_lora_changes_the_resume_fingerprint(v15_lora, v1_loras, tmp_path):
    """A HunyuanVideo checkpoint is refused on resume when its LoRA's content (same path) or scale changed: the
    fingerprint (what --resume compares; the refusal itself is tested on Wan) differs."""
    import shutil

    from freeloc_dist.checkpoint import fingerprint
    from freeloc_dist.preflight import load_config, load_profile_of

    lora = tmp_path / "l.safetensors"

    def of(scale):
        cfg = load_config(REPO_ROOT / "configs" / CONFIGS[V15], {"model.loras": [{"path": str(lora), "scale": scale}]},
                          None)
        return fingerprint(cfg, load_profile_of(cfg))

    shutil.copy(v15_lora, lora)
    first = of(0.7)
    assert of(0.7) == first and of(0.8) != first
    shutil.copy(v1_loras[0], lora)
    assert of(0.7) != first
