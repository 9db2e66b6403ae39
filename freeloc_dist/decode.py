"""VAE decode of final latents to uint8 frames, in one process or spread over the ranks.

Wan's VAE decoder is causal in time: `iter_decode` drives its frame-by-frame loop itself and hands each chunk
out as uint8 as soon as it is decoded, so decode memory is one latent frame's activations plus the VAE's
cache, whatever F is. A range that starts later runs `decode_warmup_frames` earlier frames first, so any
split of [0, F) decodes to exactly the frames of one pass.

`iter_decode_spread` uses that split over the ranks: sampling leaves the whole final latents on every rank
(the engine's predict contract), so decode needs no input exchange. Rank r decodes latent frames [s_r, e_r);
rank 0 streams its own range straight into the writer; the other ranks hold theirs as uint8 on the host (V/P
frames, e.g. 961 frames of 832x480 over 8 ranks: 144 MB each) and then send it to rank 0 in blocks of
`block_frames`, rank by rank, so rank 0 holds one block at a time. Decode time drops from F to about F/P
latent frames (+ the warm-up) per rank; encoding stays on rank 0. This module sits below both the sampler
and the parallel package: it takes any object with the Comm interface (freeloc_dist.parallel.comm) and
imports neither.

Shapes (legend): B batch (1), F latent frames, P ranks taking part, V video frames, Hp/Wp pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .plan import balanced_ranges


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """[B=1, 3, V, Hp, Wp] in [-1, 1] -> uint8 numpy [V, Hp, Wp, 3]."""
    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, V, Hp, Wp]
    return x.permute(1, 2, 3, 0).cpu().numpy()


def _denormalise(vae, latents: torch.Tensor) -> torch.Tensor:
    cfg = vae.config
    mean = torch.tensor(cfg.latents_mean, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std, dtype=torch.float32, device=latents.device).view(1, -1, 1, 1, 1)
    return latents.float() * std + mean


def can_decode_ranges(vae) -> bool:
    """Whether `iter_decode` can decode part of a video (Wan's causal VAE, Wan2.1's or Wan2.2's, untiled)."""
    return _streaming_vae(vae)


def _streaming_vae(vae) -> bool:
    return (all(hasattr(vae, a) for a in ("clear_cache", "post_quant_conv", "decoder"))
            and not getattr(vae, "use_tiling", False))


def _unpatchify(vae, out: torch.Tensor) -> torch.Tensor:
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
        streaming = _streaming_vae(vae)
        if streaming:
            vae.clear_cache()  # creates the feature cache (_feat_map)
            streaming = hasattr(vae, "_feat_map")
        if not streaming:
            assert (start, end) == (0, num_frames), "this VAE decodes whole videos only"
            yield _to_uint8(vae.decode(_denormalise(vae, latents).to(vae.dtype), return_dict=False)[0])
            return
        first = max(0, start - decode_warmup_frames(vae)) if start > 0 else 0
        z = _denormalise(vae, latents[:, :, first:end]).to(vae.dtype)
        x = vae.post_quant_conv(z)  # [1, C, end - first, H, W]
    steps = causal_decode_steps(vae, x, first)
    try:
        for f in range(first, end):
            with torch.inference_mode():
                out = _unpatchify(vae, next(steps))  # [1, 3, 1 or 4, Hp, Wp]
                chunk = _to_uint8(out) if f >= start else None
                del out
            if chunk is not None:
                yield chunk
    finally:
        vae.clear_cache()


def causal_decode_steps(vae, x: torch.Tensor, first: int = 0) -> Iterator[torch.Tensor]:
    """Wan's causal VAE decoder driven one latent frame at a time: the one home of that loop (inference here,
    differentiable in the testbed's training). `x` is `post_quant_conv` output [B, C, F', H, W] whose frame 0
    is latent frame `first`; yields each frame's decoder output [B, 3, 1 (latent frame 0) or 4, Hp, Wp] (Wan2.2:
    12 channels of 2x2 patches at half the size, see `_unpatchify`). The caller resets the VAE's feature cache
    (`vae.clear_cache()`) before and after.

    `first_chunk` is "the cache is empty", true for the first frame decoded whatever `first` is: Wan2.2's
    residual decoder then drops the duplicated frames of its shortcut in step with the upsamplers' empty-cache
    path, which would otherwise disagree in length; in a range that starts later that frame is a discarded
    warm-up frame. Wan2.1's decoder ignores the flag."""
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        yield vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=(i == 0))


def decode_video(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode latents [1, C, F, H, W] to uint8 frames [V, Hp, Wp, 3], V = 4(F-1)+1, held in memory.
    For long videos stream `iter_decode` into `write_mp4` instead."""
    return np.concatenate(list(iter_decode(vae, latents)), axis=0)


class DecodeStopped(Exception):
    """Some rank asked to stop (e.g. a preemption signal) once every rank had decoded its range."""


def decode_ranges(num_latent_frames: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """[start, end) latent frames per rank; ranks beyond F decode nothing (an empty range)."""
    parts = min(world_size, num_latent_frames)
    ranges = balanced_ranges(num_latent_frames, parts)
    return ranges + ((num_latent_frames, num_latent_frames),) * (world_size - parts)


def video_frames_of(start: int, end: int) -> int:
    """Video frames decoded from latent frames [start, end): 1 for latent frame 0, then 4 each."""
    return 0 if end <= start else 4 * (end - start) - (3 if start == 0 else 0)


def _blocks(total: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, total)) for a in range(0, total, size)]


def iter_decode_spread(vae, latents: torch.Tensor, comm, *, block_frames: int = 16,
                       stop: Callable[[], bool] = lambda: False) -> Iterator[np.ndarray]:
    """On rank 0: the uint8 frame chunks [t, Hp, Wp, 3] of the whole video, in order (as `iter_decode`).
    On the other ranks: nothing (their frames go to rank 0). Every rank must call it and exhaust it.

    `stop()` is asked on every rank once its range is decoded; if any rank says True, every rank raises
    DecodeStopped before any frame is transferred (rank 0 has then yielded only its own range).
    With one process, or a VAE that decodes whole videos only, rank 0 decodes everything."""
    dims = comm.dims
    if not dims.distributed or dims.world_size == 1 or not can_decode_ranges(vae):
        if dims.rank == 0:
            yield from iter_decode(vae, latents)
        if comm.any_flag(stop()):
            raise DecodeStopped()
        return
    ranges = decode_ranges(latents.shape[2], dims.world_size)
    start, end = ranges[dims.rank]
    if dims.rank == 0:
        frame_shape = None
        for chunk in iter_decode(vae, latents, start, end):
            frame_shape = chunk.shape[1:]
            yield chunk
        if comm.any_flag(stop()):
            raise DecodeStopped()
        for src, (s, e) in enumerate(ranges[1:], start=1):
            for a, b in _blocks(video_frames_of(s, e), block_frames):
                yield comm.recv((b - a, *frame_shape), torch.uint8, src, tag="decode").numpy()
        return
    local = np.concatenate(list(iter_decode(vae, latents, start, end))) if end > start else None
    if comm.any_flag(stop()):
        raise DecodeStopped()
    if local is not None:
        for a, b in _blocks(len(local), block_frames):
            comm.send(torch.from_numpy(local[a:b]), 0, tag="decode")
