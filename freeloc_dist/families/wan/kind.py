"""Which Wan model a directory holds, read from its configs (never from its name or path).
The generic record (ModelKind) and errors are freeloc_dist.families.kind's; this file knows Wan's configs.

`read_model_kind(model_dir)` reads model_index.json (pipeline class, `boundary_ratio`, `expand_timesteps`,
whether `transformer_2` is a component), transformer/config.json (and transformer_2/config.json),
vae/config.json and image_encoder/config.json (CLIP tokens per image; FLF2V: two images, `pos_embed_seq_len`),
and returns a frozen `ModelKind`: the task (t2v, i2v, ti2v), the experts and their switch
point, the latent and conditioning channels, the VAE's real compression, and T, the latent frames the family
was trained on. `check_model_kind` checks that the pieces agree with each other (a transformer whose input
channels do not fit the VAE, an expert without a boundary, ...), so such a model fails in preflight with one
line instead of crashing after minutes of loading. No torch import: this runs before any heavy work.
"""

from __future__ import annotations

from pathlib import Path

from ..kind import EXPERT_NAMES, ModelKind, ModelKindError, declared_trained_frames
from ..kind import read_json as _read

PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")  # model_index.json _class_name of a Wan directory
CLIP_IMAGE_TOKENS = 257  # Wan2.1 I2V: CLIP ViT-H/14 penultimate layer, 256 patches + class token

# T per family (latent frames the family was trained on). Wan2.1 and Wan2.2 A14B: 81 video frames at 16 fps
# (4x temporal VAE) = 21; Wan2.2 TI2V-5B: 121 frames at 24 fps = 31. Keyed by what the configs say, not names.
TRAINED_FRAMES_WAN = 21
TRAINED_FRAMES_TI2V = 31


def _vae_factors(vae: dict) -> tuple[int, int]:
    temporal = vae.get("scale_factor_temporal") or 2 ** sum(bool(x) for x in vae.get("temperal_downsample", []))
    spatial = vae.get("scale_factor_spatial") or 2 ** (len(vae.get("dim_mult", [1, 2, 4, 4])) - 1)
    return int(temporal), int(spatial)


def _trained_frames(root: Path, index: dict, expand: bool) -> int:
    """T: the family's, unless the directory declares its own (declared_trained_frames)."""
    declared = declared_trained_frames(root, index)
    if declared is not None:
        return declared
    return TRAINED_FRAMES_TI2V if expand else TRAINED_FRAMES_WAN


def _clip_tokens(root: Path) -> int:
    """CLIP tokens per image: (image_size / patch_size)^2 patches + the class token, from image_encoder/config.json
    (257 for Wan2.1's ViT-H/14 at 224); the constant when the encoder's config is not there (checked later)."""
    path = root / "image_encoder" / "config.json"
    if not path.is_file():
        return CLIP_IMAGE_TOKENS
    clip = _read(path)
    size, patch = clip.get("image_size"), clip.get("patch_size")
    if not (isinstance(size, int) and isinstance(patch, int) and patch > 0):
        return CLIP_IMAGE_TOKENS
    return (size // patch) ** 2 + 1


def read_model_kind(model_dir: str | Path, pipelines: tuple[str, ...] = PIPELINES) -> ModelKind:
    """The kind of the diffusers-format Wan model in `model_dir` (configs only; no weights read). `pipelines`:
    the model_index.json class names accepted (the family's own; a family built on Wan's layers names its own)."""
    root = Path(model_dir)
    index = _read(root / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    if pipeline not in pipelines:
        raise ModelKindError(f"model_index.json: _class_name={pipeline!r}: expected {' or '.join(pipelines)}")
    # A component that a pipeline does not use is saved as [null, null] by diffusers.
    has_second = isinstance(index.get("transformer_2"), list) and index["transformer_2"][0] is not None
    experts = EXPERT_NAMES if has_second else EXPERT_NAMES[:1]
    boundary = index.get("boundary_ratio")
    expand = bool(index.get("expand_timesteps", False))
    tcfg = _read(root / "transformer" / "config.json")
    vae = _read(root / "vae" / "config.json")
    temporal, spatial = _vae_factors(vae)
    z_dim = int(vae.get("z_dim", 16))
    in_channels = int(tcfg.get("in_channels", 16))
    out_channels = int(tcfg.get("out_channels") or in_channels)
    image_tokens, images = 0, 1
    if tcfg.get("image_dim") is not None:
        # FLF2V: a learned position embedding over two images' tokens (pos_embed_seq_len = 2 x 257)
        images = 2 if tcfg.get("pos_embed_seq_len") else 1
        image_tokens = images * _clip_tokens(root)
    if expand:
        task = "ti2v"
    elif in_channels != out_channels:
        task = "i2v"
    else:
        task = "t2v"
    kind = ModelKind(
        pipeline=pipeline, task=task, experts=experts,
        boundary_ratio=float(boundary) if boundary is not None else None, expand_timesteps=expand,
        latent_channels=out_channels, in_channels=in_channels, image_tokens=image_tokens,
        num_layers=int(tcfg.get("num_layers", 0)), num_heads=int(tcfg.get("num_attention_heads", 0)),
        head_dim=int(tcfg.get("attention_head_dim", 0)), patch_size=tuple(tcfg.get("patch_size", (1, 2, 2))),
        vae_temporal=temporal, vae_spatial=spatial,
        trained_frames=_trained_frames(root, index, expand), condition_images=images, family="wan",
    )
    check_model_kind(kind, root, z_dim=z_dim)
    return kind


def check_model_kind(kind: ModelKind, root: Path, *, z_dim: int) -> None:
    """The configs of one model directory must agree; raises ModelKindError with one line."""
    if kind.latent_channels != z_dim:
        raise ModelKindError(f"transformer/config.json: out_channels={kind.latent_channels}, but the VAE's "
                             f"z_dim is {z_dim}")
    if kind.task == "i2v" and kind.in_channels != 2 * z_dim + 4:
        raise ModelKindError(f"transformer/config.json: in_channels={kind.in_channels}: expected {z_dim} "
                             f"(text-to-video) or {2 * z_dim + 4} (image-to-video: noise + 4 mask + "
                             f"{z_dim} conditioning) for a VAE with z_dim {z_dim}")
    if kind.task == "ti2v" and kind.in_channels != z_dim:
        raise ModelKindError(f"transformer/config.json: in_channels={kind.in_channels}: expand_timesteps "
                             f"models take the {z_dim} latent channels only")
    if kind.pipeline == "WanImageToVideoPipeline" and kind.task != "i2v":
        raise ModelKindError(f"model_index.json: WanImageToVideoPipeline with a transformer of "
                             f"{kind.in_channels} input channels (expected {2 * z_dim + 4})")
    if kind.pipeline == "WanPipeline" and kind.task == "i2v":
        raise ModelKindError("model_index.json: WanPipeline with an image-to-video transformer "
                             f"(in_channels={kind.in_channels})")
    if kind.image_tokens and not (root / "image_encoder" / "config.json").is_file():
        raise ModelKindError("transformer/config.json: image_dim is set, but the model has no image_encoder/")
    if kind.image_tokens and not (root / "image_processor" / "preprocessor_config.json").is_file():
        raise ModelKindError("transformer/config.json: image_dim is set, but the model has no "
                             "image_processor/preprocessor_config.json (CLIP's preprocessing)")
    if kind.two_experts != (kind.boundary_ratio is not None):
        raise ModelKindError("model_index.json: transformer_2 and boundary_ratio come together (found "
                             f"transformer_2: {kind.two_experts}, boundary_ratio: {kind.boundary_ratio})")
    if kind.boundary_ratio is not None and not 0.0 < kind.boundary_ratio < 1.0:
        raise ModelKindError(f"model_index.json: boundary_ratio={kind.boundary_ratio}: must be in (0, 1)")
    if kind.two_experts:
        second = _read(root / "transformer_2" / "config.json")
        first = _read(root / "transformer" / "config.json")
        for key in ("in_channels", "out_channels", "num_layers", "num_attention_heads", "attention_head_dim",
                    "patch_size"):
            if first.get(key) != second.get(key):
                raise ModelKindError(f"transformer_2/config.json: {key}={second.get(key)!r} differs from "
                                     f"transformer/config.json ({first.get(key)!r})")


