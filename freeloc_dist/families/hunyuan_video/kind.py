"""Which HunyuanVideo model a directory holds, read from its configs (never from its name or path).

model_index.json names HunyuanVideoPipeline; transformer/config.json gives the dual-stream (`num_layers`) and
single-stream (`num_single_layers`) block counts, whose sum is the profile's layer count (60 for the published
model), heads, head width and patch; vae/config.json the VAE's compression. T is 33 latent frames (129 frames at
24 fps), unless model_index.json declares its own (tiny test models). Image-conditioned transformers
(`image_condition_type`, HunyuanVideo-I2V) are refused: only text-to-video is served. No torch import.
"""

from __future__ import annotations

from pathlib import Path

from ..kind import ModelKind, ModelKindError, declared_trained_frames, read_pipeline
from ..kind import read_json as _read

PIPELINES = ("HunyuanVideoPipeline",)
TRAINED_FRAMES = 33  # 129 video frames at 24 fps through the 4x temporal VAE


def profile_layers(tcfg: dict) -> int:
    """FreeLOC layers of a transformer config: every dual-stream block, then every single-stream block."""
    return int(tcfg.get("num_layers", 20)) + int(tcfg.get("num_single_layers", 40))


def patch_of(tcfg: dict) -> tuple[int, int, int]:
    p = int(tcfg.get("patch_size", 2))
    return int(tcfg.get("patch_size_t", 1)), p, p


def read_model_kind(model_dir: str | Path, pipelines: tuple[str, ...] = PIPELINES) -> ModelKind:
    root = Path(model_dir)
    index, pipeline = read_pipeline(root, pipelines)
    tcfg = _read(root / "transformer" / "config.json")
    vae = _read(root / "vae" / "config.json")
    if tcfg.get("image_condition_type") is not None:
        raise ModelKindError(f"transformer/config.json: image_condition_type={tcfg['image_condition_type']!r}: "
                             "HunyuanVideo image-to-video is not supported (text-to-video only)")
    in_channels = int(tcfg.get("in_channels", 16))
    out_channels = int(tcfg.get("out_channels") or in_channels)
    z_dim = int(vae.get("latent_channels", 16))
    if out_channels != z_dim or in_channels != z_dim:
        raise ModelKindError(f"transformer/config.json: in/out_channels={in_channels}/{out_channels}, but the VAE's "
                             f"latent_channels is {z_dim}")
    declared = declared_trained_frames(root, index)
    return ModelKind(
        pipeline=pipeline, task="t2v", experts=("transformer",), boundary_ratio=None, expand_timesteps=False,
        latent_channels=out_channels, in_channels=in_channels, image_tokens=0,
        num_layers=profile_layers(tcfg), num_heads=int(tcfg.get("num_attention_heads", 24)),
        head_dim=int(tcfg.get("attention_head_dim", 128)), patch_size=patch_of(tcfg),
        vae_temporal=int(vae.get("temporal_compression_ratio", 4)),
        vae_spatial=int(vae.get("spatial_compression_ratio", 8)),
        trained_frames=declared if declared is not None else TRAINED_FRAMES, family="hunyuan_video",
    )
