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

from collections.abc import Callable, Iterator

import numpy as np
import torch

from .families import family_of_vae
from .plan import balanced_ranges


def can_decode_ranges(vae) -> bool:
    """Whether `iter_decode` can decode part of a video (the VAE's family streams it frame by frame)."""
    return family_of_vae(vae).can_decode_ranges(vae)


def iter_decode(vae, latents: torch.Tensor, start: int = 0, end: int | None = None) -> Iterator[np.ndarray]:
    """Decode latent frames [start, end) of latents [1, C, F, H, W] to uint8 frame chunks [t, Hp, Wp, 3], in
    order, holding one chunk at a time (the VAE's family drives its decoder; see its iter_decode). A range that
    starts later decodes to exactly the frames of one pass over the whole video."""
    return family_of_vae(vae).iter_decode(vae, latents, start, end)


def decode_video(vae, latents: torch.Tensor) -> np.ndarray:
    """Decode latents [1, C, F, H, W] to uint8 frames [V, Hp, Wp, 3] (V = 4(F-1)+1 for Wan), held in memory.
    For long videos stream `iter_decode` into `write_mp4` instead."""
    return np.concatenate(list(iter_decode(vae, latents)), axis=0)


class DecodeStopped(Exception):
    """Some rank asked to stop (e.g. a preemption signal) once every rank had decoded its range."""


def decode_ranges(num_latent_frames: int, world_size: int) -> tuple[tuple[int, int], ...]:
    """[start, end) latent frames per rank; ranks beyond F decode nothing (an empty range)."""
    parts = min(world_size, num_latent_frames)
    ranges = balanced_ranges(num_latent_frames, parts)
    return ranges + ((num_latent_frames, num_latent_frames),) * (world_size - parts)


def video_frames_of(start: int, end: int, temporal: int) -> int:
    """Video frames decoded from latent frames [start, end) of a VAE with `temporal` compression: 1 for latent
    frame 0, then `temporal` each."""
    return 0 if end <= start else temporal * (end - start) - (temporal - 1 if start == 0 else 0)


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
        temporal = family_of_vae(vae).vae_scale_factors(vae)[0]
        for src, (s, e) in enumerate(ranges[1:], start=1):
            for a, b in _blocks(video_frames_of(s, e, temporal), block_frames):
                yield comm.recv((b - a, *frame_shape), torch.uint8, src, tag="decode").numpy()
        return
    local = np.concatenate(list(iter_decode(vae, latents, start, end))) if end > start else None
    if comm.any_flag(stop()):
        raise DecodeStopped()
    if local is not None:
        for a, b in _blocks(len(local), block_frames):
            comm.send(torch.from_numpy(local[a:b]), 0, tag="decode")
