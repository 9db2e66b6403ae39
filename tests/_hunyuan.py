"""The tiny random HunyuanVideo as a stock diffusers HunyuanVideoPipeline, shared by the in-process and torchrun
tests of enable_freeloc / parallelize_pipeline on it."""

import torch

from freeloc_dist.config import REPO_ROOT

HUNYUAN_PROFILE = REPO_ROOT / "configs" / "profiles" / "tiny-random-hunyuan.yaml"  # T = 5 latent frames
HUNYUAN_SHORT = 17  # 5 latent frames = T: stock
HUNYUAN_LONG = 25  # 7 latent frames > T: every layer kind of the profile out of distribution


def tiny_hunyuan_pipeline():
    from diffusers import HunyuanVideoPipeline

    from freeloc_dist.families.hunyuan_video.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    pipe = HunyuanVideoPipeline(text_encoder=c.text_encoder, tokenizer=c.tokenizer, transformer=c.transformer,
                                vae=c.vae, scheduler=c.scheduler, text_encoder_2=c.text_encoder_2,
                                tokenizer_2=c.tokenizer_2)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render_hunyuan(pipe, frames, **kw):
    """Float32 latents of 2 steps with embedded guidance and true CFG 1.5 (both passes; the prompt's padded text
    and its mask reach the joint layers)."""
    args = dict(prompt="a red fox running", negative_prompt="blurry", true_cfg_scale=1.5, guidance_scale=6.0,
                num_frames=frames, height=32, width=32, num_inference_steps=2, max_sequence_length=32,
                output_type="latent", generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kw}).frames
