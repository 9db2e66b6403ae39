"""HunyuanVideo's VAE (diffusers' AutoencoderKLHunyuanVideo): compression factors, the latents' scaling, and its
framewise decode driven tile by tile so that any range of latent frames decodes on its own.

diffusers decodes a long video in temporal tiles (`_temporal_tiled_decode`): tile i is latent frames
[i s, i s + m + 1) (s = tile stride, m = minimum tile, in latent frames), decoded alone; its first frame is dropped
(after tile 0) and its first `blend` frames are blended with the previous tile's last ones; tile i then gives the
output frames [i S + 1, (i + 1) S + 1) (S = stride in video frames; tile 0 also frame 0). Output chunk i depends
on tiles i - 1 and i only, so a range of output frames needs the tiles that cover it and one before: memory is two
tiles whatever the length, and any split into ranges gives exactly the frames of diffusers' decode.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from ...video import to_uint8


def vae_scale_factors(vae) -> tuple[int, int]:
    return int(vae.config.temporal_compression_ratio), int(vae.config.spatial_compression_ratio)


def can_decode_ranges(vae) -> bool:
    """With framewise decoding (diffusers' default) a video decodes tile by tile; without it, whole only."""
    return bool(getattr(vae, "use_framewise_decoding", False))


def _video_frame(latent_frame: int, temporal: int) -> int:
    """The first video frame of a latent frame (1 for latent frame 0, then `temporal` each)."""
    return 0 if latent_frame == 0 else temporal * (latent_frame - 1) + 1


def _decode_tile(vae, z: torch.Tensor) -> torch.Tensor:
    """One temporal tile, as diffusers' _temporal_tiled_decode decodes it (spatially tiled when enabled and large)."""
    min_h = vae.tile_sample_min_height // vae.spatial_compression_ratio
    min_w = vae.tile_sample_min_width // vae.spatial_compression_ratio
    if vae.use_tiling and (z.shape[-1] > min_w or z.shape[-2] > min_h):
        return vae.tiled_decode(z, return_dict=True).sample
    return vae.decoder(vae.post_quant_conv(z))


def iter_decode(vae, latents: torch.Tensor, start: int = 0, end: int | None = None) -> Iterator[np.ndarray]:
    """uint8 chunks [t, Hp, Wp, 3] of the video frames of latent frames [start, end) of latents [1, C, F, H, W]
    (the pipeline's latents: the VAE gets latents / scaling_factor)."""
    num_frames = latents.shape[2]
    end = num_frames if end is None else end
    assert 0 <= start < end <= num_frames, (start, end, num_frames)
    temporal = vae.temporal_compression_ratio
    z_all = latents.to(vae.dtype) / vae.config.scaling_factor
    tile = vae.tile_sample_min_num_frames // temporal
    if not can_decode_ranges(vae) or num_frames <= tile:
        assert (start, end) == (0, num_frames), "this VAE decodes whole videos only"
        with torch.inference_mode():
            yield to_uint8(vae.decode(z_all, return_dict=False)[0])
        return
    step = vae.tile_sample_stride_num_frames // temporal  # latent frames between tiles
    out_step = vae.tile_sample_stride_num_frames  # video frames each tile contributes
    blend = vae.tile_sample_min_num_frames - vae.tile_sample_stride_num_frames
    total = temporal * (num_frames - 1) + 1  # video frames of the whole video
    v0, v1 = _video_frame(start, temporal), min(total, _video_frame(end - 1, temporal) + (temporal if end > 1 else 1))
    first = max(0, (v0 - 1) // out_step) if v0 > 0 else 0  # the output chunk holding frame v0
    prev = None
    for i in range(max(0, first - 1), len(range(0, num_frames, step))):
        lo = 0 if i == 0 else i * out_step + 1  # the chunk's output frames [lo, hi)
        if lo >= v1:
            break
        with torch.inference_mode():
            decoded = _decode_tile(vae, z_all[:, :, i * step: i * step + tile + 1])
            if i > 0:
                decoded = decoded[:, :, 1:]
                decoded = vae.blend_t(prev, decoded, blend) if prev is not None else decoded
            prev = decoded
            if i < first:
                continue
            chunk = decoded[:, :, : out_step + (1 if i == 0 else 0)]
            a, b = max(v0, lo), min(v1, lo + chunk.shape[2])
            if b > a:
                yield to_uint8(chunk[:, :, a - lo: b - lo])
