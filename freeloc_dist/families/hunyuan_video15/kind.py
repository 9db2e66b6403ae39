"""Which HunyuanVideo 1.5 model a directory holds, read from its configs (never from its name or path).

model_index.json names HunyuanVideo15Pipeline (text-to-video) or HunyuanVideo15ImageToVideoPipeline
(image-to-video): the task comes from the pipeline class, because both transformers take the same input, noise +
conditioning latents + a mask channel (in_channels = 2 C + 1; text-to-video passes zeros). transformer/config.json
gives the dual-stream block count (`num_layers`, 54 published: the profile's layer count), heads, head width and
patch; vae/config.json the VAE's compression (16x spatial, 4x temporal). T is 31 latent frames (121 frames at
24 fps), unless the directory declares its own (tiny test models). No torch import.
"""

from __future__ import annotations

from pathlib import Path

from ..hunyuan_video.kind import patch_of  # the same config keys (a saved config always has them)
from ..kind import ModelKind, ModelKindError, declared_trained_frames, read_pipeline
from ..kind import read_json as _read

T2V_PIPELINE = "HunyuanVideo15Pipeline"
I2V_PIPELINE = "HunyuanVideo15ImageToVideoPipeline"
PIPELINES = (T2V_PIPELINE, I2V_PIPELINE)
TRAINED_FRAMES = 31  # 121 video frames at 24 fps through the 4x temporal VAE
MASK_CHANNELS = 1  # the conditioning mask: 1 on the given image's latent frame


def read_model_kind(model_dir: str | Path, pipelines: tuple[str, ...] = PIPELINES) -> ModelKind:
    root = Path(model_dir)
    index, pipeline = read_pipeline(root, pipelines)
    tcfg = _read(root / "transformer" / "config.json")
    vae = _read(root / "vae" / "config.json")
    z_dim = int(vae.get("latent_channels", 32))
    in_channels = int(tcfg.get("in_channels", 65))
    out_channels = int(tcfg.get("out_channels") or in_channels)
    if out_channels != z_dim or in_channels != 2 * z_dim + MASK_CHANNELS:
        raise ModelKindError(f"transformer/config.json: in/out_channels={in_channels}/{out_channels}, but the VAE's "
                             f"latent_channels is {z_dim} (expected {2 * z_dim + MASK_CHANNELS}/{z_dim})")
    if tcfg.get("use_meanflow"):
        raise ModelKindError("transformer/config.json: use_meanflow=true (a step-distilled model): not supported")
    if pipeline == I2V_PIPELINE and not (root / "image_encoder" / "config.json").is_file():
        raise ModelKindError("model directory: missing image_encoder/config.json (image-to-video needs it)")
    declared = declared_trained_frames(root, index)
    return ModelKind(
        pipeline=pipeline, task="i2v" if pipeline == I2V_PIPELINE else "t2v", experts=("transformer",),
        boundary_ratio=None, expand_timesteps=False, latent_channels=out_channels, in_channels=in_channels,
        image_tokens=0,  # SigLIP's tokens join the text inside the transformer (not Wan's CLIP-before-text rule)
        num_layers=int(tcfg.get("num_layers", 54)), num_heads=int(tcfg.get("num_attention_heads", 16)),
        head_dim=int(tcfg.get("attention_head_dim", 128)), patch_size=patch_of(tcfg),
        vae_temporal=int(vae.get("temporal_compression_ratio", 4)),
        vae_spatial=int(vae.get("spatial_compression_ratio", 16)),
        trained_frames=declared if declared is not None else TRAINED_FRAMES, family="hunyuan_video15",
    )
