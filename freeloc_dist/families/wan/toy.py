"""The toy Wan of the testbed: the real diffusers classes, small enough to train on two CPU cores.

Latent scheme. Text-to-video rendering only ever *decodes*, so the latent is a fixed, hand-designed
encoding of the video and only the AutoencoderKLWan decoder is trained to invert it (its encoder is left
at random initialisation and is not used anywhere). The encoding keeps Wan's geometry, 4x temporal and 8x
spatial compression: latent frame k is video frame 4k (frame 0 first, as in Wan's causal VAE), average-pooled
4x4 to a quarter-resolution RGB image and packed 2x2 -> 12 channels per latent cell, then normalised with
the per-channel statistics stored in the VAE config (latents_mean / latents_std, exactly as Wan stores
them), so the sampling loop's un-normalisation applies unchanged. The decoder must therefore upsample
4x, sharpen shapes and interpolate the three frames between two latent frames, through Wan's causal cache.

Transformer: WanTransformer3DModel, patch 1x2x2, 2 heads x head_dim 48 (temporal RoPE dims 16, i.e. eight
temporal frequencies, 1 to 0.0003 rad per frame; Wan2.1 has 22, 1 to 0.00015), 6 layers, trained with Wan's
flow-matching objective on clips of TRAINED_FRAMES latent frames. Text: a frozen random 2-layer UMT5 and
byte-level tokenizer (freeloc_dist.families.wan.tiny); the transformer's cross-attention learns to read it.

Shapes (legend): B batch, V video frames, P pixels, C latent channels, F latent frames, H/W latent cells.
"""

from __future__ import annotations

import numpy as np
import torch

from freeloc_dist.models import Components

from .loading import save_components  # noqa: F401 (re-exported)

TRAINED_FRAMES = 13  # latent frames per training clip (49 video frames)
VIDEO_SIZE = 64  # pixels per side
Z_DIM = 12  # 3 colours x 2x2 quarter-resolution pixels per latent cell
POOL = 4  # spatial average pooling before packing (8x = POOL x 2)
MAX_TEXT_TOKENS = 48
TEXT_SEED = 1234

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=48,  # RoPE split t/h/w = 16 / 16 / 16
    in_channels=Z_DIM,
    out_channels=Z_DIM,
    text_dim=32,  # freeloc_dist.families.wan.tiny's UMT5 width
    freq_dim=64,
    ffn_dim=256,
    num_layers=6,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
)

VAE_CONFIG = dict(
    base_dim=16,
    z_dim=Z_DIM,
    dim_mult=[1, 2, 2, 2],  # three upsamples: 8x spatial
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True, True],  # two temporal upsamples: 4x
)


def pack_latents(video: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Un-normalised latents [B, C, F, H, W] of uint8 videos [B, V, P, P, 3] (V = 4(F-1)+1)."""
    x = torch.as_tensor(np.asarray(video)).float() / 127.5 - 1  # [B, V, P, P, 3]
    x = x[:, ::4].permute(0, 1, 4, 2, 3)  # [B, F, 3, P, P]
    b, f, _, p, _ = x.shape
    x = torch.nn.functional.avg_pool2d(x.reshape(b * f, 3, p, p), POOL)  # [B*F, 3, P/4, P/4]
    x = torch.nn.functional.pixel_unshuffle(x, 2)  # [B*F, 12, P/8, P/8]
    return x.reshape(b, f, Z_DIM, p // 8, p // 8).permute(0, 2, 1, 3, 4).contiguous()


def normalise(vae_config, latents: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(vae_config.latents_mean, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    return (latents - mean) / std


def decode_frames(vae, z: torch.Tensor) -> torch.Tensor:
    """Differentiable decode of un-normalised latents [B, C, F, H, W] -> video [B, 3, V, P, P] (no clamp).

    The same frame-by-frame causal loop as inference (freeloc_dist.families.wan.vae.causal_decode_steps)."""
    from .vae import causal_decode_steps

    vae.clear_cache()
    outs = list(causal_decode_steps(vae, vae.post_quant_conv(z)))
    vae.clear_cache()
    return torch.cat(outs, dim=2)


def build_toy_components(seed: int = 0, latents_mean=None, latents_std=None,
                         transformer_overrides: dict | None = None) -> Components:
    """The untrained toy model (float32, CPU). The text encoder is fixed by TEXT_SEED, never trained.
    `transformer_overrides` replace entries of TRANSFORMER_CONFIG (e.g. num_attention_heads, attention_head_dim)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    from .tiny import build_tiny_components

    base = build_tiny_components(TEXT_SEED)  # text encoder, tokenizer, scheduler
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**{**TRANSFORMER_CONFIG, **(transformer_overrides or {})})
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**VAE_CONFIG,
                               latents_mean=list(latents_mean if latents_mean is not None else [0.0] * Z_DIM),
                               latents_std=list(latents_std if latents_std is not None else [1.0] * Z_DIM))
    return Components(transformer=transformer, vae=vae, text_encoder=base.text_encoder.eval(),
                         tokenizer=base.tokenizer, scheduler=base.scheduler,
                         trained_frames=TRAINED_FRAMES)


