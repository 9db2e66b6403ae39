"""Writing render outputs (mp4 video, latents) atomically.

Every output is written to a temporary file in the destination folder and moved over the final name with
os.replace only once complete, so a crash, a kill or a full disk never leaves a partial file under the name
a rendering queue is waiting for. Video goes through the ffmpeg binary that ships with imageio-ffmpeg
(H.264, yuv420p: plays everywhere).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoded pixels [B=1, 3, V, Hp, Wp] in [-1, 1] -> uint8 numpy [V, Hp, Wp, 3]."""
    import torch

    x = ((video[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [3, V, Hp, Wp]
    return x.permute(1, 2, 3, 0).cpu().numpy()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `final` (same suffix); on success move it to `final`, else delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}")
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp makes 0600, and a writer may recreate the file (safetensors did): the usual permissions,
        # set on what was written, just before it takes the final name
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_mp4(path: str | Path, frames: np.ndarray | Iterable[np.ndarray], fps: int) -> Path:
    """Write uint8 frames to an H.264 mp4 at `path` (atomically).

    `frames` is one array [V, H, W, 3] or an iterable of chunks [t, H, W, 3] (e.g. freeloc_dist.decode.iter_decode),
    which are sent to ffmpeg as they arrive, so the video is never held in memory."""
    import imageio_ffmpeg

    chunks = iter([frames]) if isinstance(frames, np.ndarray) else iter(frames)
    path = Path(path)
    with atomic_path(path) as tmp:
        writer, size = None, None
        try:
            for chunk in chunks:
                chunk = np.ascontiguousarray(chunk)
                if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[-1] != 3:
                    raise ValueError(f"expected uint8 frames [V, H, W, 3], got {chunk.dtype} {chunk.shape}")
                if writer is None:
                    size = chunk.shape[1:3]
                    writer = imageio_ffmpeg.write_frames(
                        str(tmp), (size[1], size[0]), fps=fps, codec="libx264", pix_fmt_in="rgb24",
                        pix_fmt_out="yuv420p", macro_block_size=1, ffmpeg_log_level="error",
                        output_params=["-f", "mp4"],
                    )
                    writer.send(None)  # start ffmpeg
                elif chunk.shape[1:3] != size:
                    raise ValueError(f"frame size changed from {size} to {chunk.shape[1:3]}")
                for i in range(chunk.shape[0]):
                    writer.send(chunk[i])
            if writer is None:
                raise ValueError("no frames to write")
        finally:
            if writer is not None:
                writer.close()
    return path


def write_json(path: str | Path, data) -> Path:
    """Write `data` as indented JSON (atomically)."""
    import json

    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def read_mp4_frame_count(path: str | Path) -> int:
    """Number of frames in a video file (decodes it; for tests and checks)."""
    import imageio_ffmpeg

    return imageio_ffmpeg.count_frames_and_secs(str(path))[0]


def save_latents(path: str | Path, latents) -> Path:
    """Save a latents tensor as a safetensors file holding one tensor named `latents` (atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({"latents": latents.detach().to("cpu").contiguous()}, str(tmp))
    return path
