"""Wan's VAE (diffusers' AutoencoderKLWan, Wan2.1's and Wan2.2's): its compression factors, the latents'
normalisation statistics, and its causal decoder driven one latent frame at a time (freeloc_dist.decode streams
and spreads that loop over ranks; the testbed trains through it).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from ...video import to_uint8


def vae_scale_factors(vae) -> tuple[int, int]:
    """(temporal, spatial) compression of a Wan VAE, from its config."""
    cfg = vae.config
    temporal = getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample)
    spatial = getattr(cfg, "scale_factor_spatial", None) or 2 ** (len(cfg.dim_mult) - 1)
    return int(temporal), int(spatial)


def latent_stats(vae, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1, C, 1, 1, 1] float32 of the latents' per-channel normalisation, from the VAE's config:
    normalised latents are (z - mean) / std of the VAE posterior z."""
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=device).view(1, -1, 1, 1, 1)
    return mean, std


def denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    mean, std = latent_stats(vae, latents.device)
    return latents.float() * std + mean


def streaming_vae(vae) -> bool:
    return (all(hasattr(vae, a) for a in ("clear_cache", "post_quant_conv", "decoder"))
            and not getattr(vae, "use_tiling", False))


def unpatchify(vae, out: torch.Tensor) -> torch.Tensor:
    """Wan2.2's VAE decodes to 2x2 pixel patches as channels (patch_size 2, 12 channels): back to pixels, per
    chunk (a spatial reshuffle, so chunk by chunk equals the whole video's)."""
    patch = getattr(vae.config, "patch_size", None)
    if patch is None:
        return out
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    return unpatchify(out, patch_size=patch)


def decode_warmup_frames(vae) -> int:
    """Latent frames a decode must start early to reproduce frame `start` exactly (Wan VAE's receptive field).

    Each causal temporal conv (kernel k) caches k-1 frames of its input; a chain of them reaches back the sum
    of those, counted in latent frames (halved after each temporal upsampling). Starting that many frames
    early with an empty cache gives bitwise the frames of a decode from frame 0 (tests/test_decode.py).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanResample

    reach, rate, seen = 0.0, 1, set()
    for module in vae.decoder.modules():
        if isinstance(module, WanResample) and module.mode == "upsample3d":
            reach += (module.time_conv.kernel_size[0] - 1) / rate
            seen.add(id(module.time_conv))
            rate *= 2
        elif isinstance(module, WanCausalConv3d) and id(module) not in seen:
            reach += (module.kernel_size[0] - 1) / rate
    return math.ceil(reach)


def causal_decode_steps(vae, x: torch.Tensor, first: int = 0) -> Iterator[torch.Tensor]:
    """Wan's causal VAE decoder driven one latent frame at a time: the one home of that loop (inference here,
    differentiable in the testbed's training). `x` is `post_quant_conv` output [B, C, F', H, W] whose frame 0
    is latent frame `first`; yields each frame's decoder output [B, 3, 1 (latent frame 0) or 4, Hp, Wp] (Wan2.2:
    12 channels of 2x2 patches at half the size, see `unpatchify`). The caller resets the VAE's feature cache
    (`vae.clear_cache()`) before and after.

    `first_chunk` is "the cache is empty", true for the first frame decoded whatever `first` is: Wan2.2's
    residual decoder then drops the duplicated frames of its shortcut in step with the upsamplers' empty-cache
    path, which would otherwise disagree in length; in a range that starts later that frame is a discarded
    warm-up frame. Wan2.1's decoder ignores the flag."""
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        yield vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(i == 0))


def can_decode_ranges(vae) -> bool:
    """Whether `iter_decode` can decode part of a video (Wan's causal VAE, Wan2.1's or Wan2.2's, untiled)."""
    return streaming_vae(vae)


def iter_decode(vae, latents: torch.Tensor, start: int = 0, end: int | None = None) -> Iterator[np.ndarray]:
    """Decode latent frames [start, end) of latents [1, C, F, H, W] to uint8 frame chunks [t, Hp, Wp, 3]
    (1 frame for latent frame 0, then 4 per latent frame; V = 4(F-1)+1 for the whole video).

    Wan's VAE decoder is causal in time: it runs one latent frame at a time with a feature cache. We drive
    that loop ourselves and hand each chunk out as uint8 as soon as it is decoded, so decode memory is the
    VAE's activations for one latent frame plus its cache, whatever F is (961 frames at 832x480 would be
    4.6 GB as one float tensor). A consumer that writes each chunk (freeloc_dist.video.write_mp4) never
    holds the video. A range that starts later runs `decode_warmup_frames` earlier frames first (discarded),
    so any split of [0, F) into ranges decodes to exactly the frames of one pass. Falls back to the VAE's own
    decode (one chunk, whole video only) for models without that structure.
    """
    num_frames = latents.shape[2]
    end = num_frames if end is None else end
    assert 0 <= start < end <= num_frames, (start, end, num_frames)
    with torch.inference_mode():
        streaming = streaming_vae(vae)
        if streaming:
            vae.clear_cache()  # creates the feature cache (_feat_map)
            streaming = hasattr(vae, "_feat_map")
        if not streaming:
            assert (start, end) == (0, num_frames), "this VAE decodes whole videos only"
            yield to_uint8(vae.decode(denormalise(vae, latents).to(vae.dtype), return_dict=False)[0])
            return
        first = max(0, start - decode_warmup_frames(vae)) if start > 0 else 0
        z = denormalise(vae, latents[:, :, first:end]).to(vae.dtype)
        x = vae.post_quant_conv(z)  # [1, C, end - first, H, W]
    steps = causal_decode_steps(vae, x, first)
    try:
        for f in range(first, end):
            with torch.inference_mode():
                out = unpatchify(vae, next(steps))  # [1, 3, 1 or 4, Hp, Wp]
                chunk = to_uint8(out) if f >= start else None
                del out
            if chunk is not None:
                yield chunk
    finally:
        vae.clear_cache()
