"""HunyuanVideo 1.5's VAE (diffusers' AutoencoderKLHunyuanVideo15): compression factors and decode."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ...video import to_uint8


def vae_scale_factors(vae) -> tuple[int, int]:
    return int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)


def can_decode_ranges(vae) -> bool:
    return False


def iter_decode(vae, latents: torch.Tensor, start: int = 0, end: int | None = None) -> Iterator[np.ndarray]:
    num_frames = latents.shape[2]
    end = num_frames if end is None else end
    assert (start, end) == (0, num_frames), "this VAE decodes whole videos only"
    with torch.inference_mode():
        yield to_uint8(vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0])
