"""The tiny random HunyuanVideo and HunyuanVideo 1.5 as stock diffusers pipelines, shared by the in-process and
torchrun tests of enable_freeloc / parallelize_pipeline on them."""

import torch

from freeloc_dist.config import REPO_ROOT

HUNYUAN_PROFILE = REPO_ROOT / "configs" / "profiles" / "tiny-random-hunyuan.yaml"  # T = 5 latent frames
HUNYUAN_SHORT = 17  # 5 latent frames = T: stock
HUNYUAN_LONG = 25  # 7 latent frames > T: every layer kind of the profile out of distribution
HUNYUAN15 = REPO_ROOT / "assets" / "tiny-hunyuan15"
HUNYUAN15_I2V = REPO_ROOT / "assets" / "tiny-hunyuan15-i2v"
IMAGE = REPO_ROOT / "assets" / "i2v-first.png"
HUNYUAN15_PROFILE = REPO_ROOT / "configs" / "profiles" / "tiny-random-hunyuan15.yaml"  # T = 3 latent frames


def tiny_hunyuan_pipeline():
    from diffusers import HunyuanVideoPipeline

    from freeloc_dist.families.hunyuan_video.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    pipe = HunyuanVideoPipeline(text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer,
                                vae=c.vae, scheduler=c.scheduler, text_encoder_2=c.text_encoder_2,
                                tokenizer_2=c.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def hunyuan_transformer_inputs(frames, seed=1, padded=2):
    """Random inputs of one tiny HunyuanVideo transformer call ([1, 4, frames, 8, 8] latents: 4 x 4 tokens a
    frame), with `padded` masked text tokens as the stock pipeline masks its padding."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, 6, 32, generator=g)
    mask = torch.ones(1, 6)
    mask[:, 6 - padded:] = 0
    return dict(hidden_states=torch.randn(1, 4, frames, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                encoder_hidden_states=text, encoder_attention_mask=mask,
                pooled_projections=torch.randn(1, 16, generator=g), guidance=torch.tensor([6000.0]), return_dict=False)


def render_hunyuan(pipe, frames, **kw):
    """Float32 latents of 2 steps with embedded guidance and true CFG 1.5 (both passes; the prompt's padded text
    and its mask reach the joint layers)."""
    args = dict(prompt="a red fox running", negative_prompt="blurry", true_cfg_scale=1.5, guidance_scale=6.0,
                num_frames=frames, height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kw}).frames


def pipeline_args(parts):
    """HunyuanVideo 1.5's pipeline parts from the production loader's components, with real CFG 6 (its guider)."""
    from diffusers.guiders import ClassifierFreeGuidance

    return dict(text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, transformer=parts.transformer,
                vae=parts.vae, scheduler=type(parts.scheduler).from_config(parts.scheduler.config),
                text_encoder_2=parts.text_encoder_2, tokenizer_2=parts.tokenizer_2,
                guider=ClassifierFreeGuidance(guidance_scale=6.0))


def tiny_pipeline15(pipe):
    """The pipeline with the config's Qwen length (sampling.max_text_tokens: 64, the pipeline's own 1000 would pad
    every prompt to 1108 tokens; padding is masked either way) and a 32 x 32 target size (the image-to-video
    bucket of a square-ish image: the renders' 32 x 32, which keeps the tests' VAE work small), quiet."""
    pipe.tokenizer_max_length = 64
    pipe.target_size = 32
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan15_pipeline():
    """assets/tiny-hunyuan15 (through the production loader) as a stock HunyuanVideo15Pipeline."""
    from diffusers import HunyuanVideo15Pipeline

    from freeloc_dist.models import load_components

    return tiny_pipeline15(HunyuanVideo15Pipeline(**pipeline_args(load_components(HUNYUAN15, "float32", "cpu"))))


def render_hunyuan15(pipe):
    """Float32 latents of 2 steps at 25 frames (7 latent frames > T = 3) with real CFG (both passes)."""
    return pipe(prompt="a red fox running through fresh snow", height=32, width=32, num_frames=25,
                num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").frames


def tiny_hunyuan15_i2v_pipeline(parts=None):
    """assets/tiny-hunyuan15-i2v (through the production loader, or its loaded `parts`) as a stock
    HunyuanVideo15ImageToVideoPipeline."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline

    from freeloc_dist.models import load_components

    parts = parts or load_components(HUNYUAN15_I2V, "float32", "cpu")
    return tiny_pipeline15(HunyuanVideo15ImageToVideoPipeline(**pipeline_args(parts), image_encoder=parts.image_encoder,
                                                              feature_extractor=parts.image_processor))


def render_hunyuan15_i2v(pipe, frames=25):
    """Float32 latents of 2 steps at 25 frames (7 latent frames > T = 3) from the test image (its VAE latent and
    SigLIP tokens), real CFG with a negative prompt."""
    from freeloc_dist.images import load_image

    return pipe(image=load_image(IMAGE), prompt="a red fox running through fresh snow", negative_prompt="blurry",
                num_frames=frames, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                output_type="latent").frames
