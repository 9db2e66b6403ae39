"""Loading the components of a Wan model (text- or image-to-video) from a local diffusers-format directory.

The directory layout is the one `diffusers` writes for WanPipeline: model_index.json and the subfolders
transformer/ (WanTransformer3DModel), vae/ (AutoencoderKLWan), text_encoder/ (transformers UMT5EncoderModel),
tokenizer/ (anything AutoTokenizer reads) and scheduler/ (the diffusers scheduler class that
scheduler_config.json names); Wan2.2 A14B adds transformer_2/, WanImageToVideoPipeline's Wan2.1 models
image_encoder/ (transformers CLIPVisionModel) and image_processor/ (CLIPImageProcessor). Nothing here ever
downloads: every from_pretrained call is local_files_only, and `check_model_dir` verifies the layout first
so a wrong path fails in milliseconds with a ConfigError that names the missing file, not minutes later
inside a loader. The tiny test model (freeloc_dist.families.wan.tiny) is saved
in the same layout and loaded through this same code. freeloc_dist.models is the family-blind front door.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from freeloc_dist.config import ConfigError
from freeloc_dist.models import Components, resolve_dtype

from ..layout import check_weights_against
from ..layout import has_weights as _has_weights
from ..layout import load_scheduler as _load_scheduler
from ..layout import weights_signature as _weights_signature

# subfolder -> the config file that must exist in it
_REQUIRED_CONFIGS = {
    "transformer": "config.json",
    "vae": "config.json",
    "text_encoder": "config.json",
    "tokenizer": "tokenizer_config.json",
    "scheduler": "scheduler_config.json",
}
_WEIGHT_SUBFOLDERS = ("transformer", "vae", "text_encoder")
# Image-to-video (Wan2.1 I2V / FLF2V): CLIP's vision tower and its preprocessor, when model_index.json names them
_IMAGE_ENCODER, _IMAGE_PROCESSOR = "image_encoder", "image_processor"


def check_model_dir(model_dir: str | Path) -> Path:
    """Verify the diffusers layout of `model_dir` without loading anything; returns it as a Path."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"config error: model.path={str(root)!r}: model directory not found")
    required = [root / "model_index.json"] + [root / sub / name for sub, name in _REQUIRED_CONFIGS.items()]
    for path in required:
        if not path.is_file():
            raise ConfigError(f"config error: model.path={str(root)!r}: missing {path.relative_to(root)}")
    try:
        index = json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"config error: model.path={str(root)!r}: model_index.json is not readable JSON") from None
    for sub in weight_subfolders(index):
        if not (root / sub).is_dir() or not _has_weights(root / sub):
            raise ConfigError(f"config error: model.path={str(root)!r}: no weights in {sub}/")
    extra = [root / _IMAGE_ENCODER / "config.json"] if _named(index, _IMAGE_ENCODER) else []
    if _named(index, _IMAGE_PROCESSOR):
        extra.append(root / _IMAGE_PROCESSOR / "preprocessor_config.json")
    for path in extra:
        if not path.is_file():
            raise ConfigError(f"config error: model.path={str(root)!r}: missing {path.relative_to(root)}")
    return root


def _named(index, component: str) -> bool:
    """model_index.json names `component` (diffusers writes [null, null] for one a pipeline lacks)."""
    entry = index.get(component) if isinstance(index, dict) else None
    return isinstance(entry, list) and bool(entry) and entry[0] is not None


def weight_subfolders(index) -> tuple[str, ...]:
    """The subfolders holding weights, from model_index.json's contents (a second expert adds its own)."""
    return (_WEIGHT_SUBFOLDERS + (("transformer_2",) if _named(index, "transformer_2") else ())
            + ((_IMAGE_ENCODER,) if _named(index, _IMAGE_ENCODER) else ()))


def _index_of(root: Path):
    try:
        return json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        return None


def check_weights_match_config(model_dir: str | Path) -> None:
    """Every safetensors tensor of transformer/ and vae/ against the model its config.json builds (on the
    meta device: shapes only, no memory): a config that disagrees with its weights (num_layers lowered or
    raised, a head count changed) is a one-line ConfigError before anything loads, not a dropped layer or a
    traceback after loading. The text encoder is checked for unexpected or misshapen tensors."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    root = Path(model_dir)
    builders = {"transformer": WanTransformer3DModel.from_config, "transformer_2": WanTransformer3DModel.from_config,
                "vae": AutoencoderKLWan.from_config, "text_encoder": _umt5_of, _IMAGE_ENCODER: _clip_of}
    for sub in weight_subfolders(_index_of(root)):
        # diffusers saves every tensor (transformers leaves tied ones out)
        check_weights_against(root, sub, builders[sub], all_tensors=sub != "text_encoder")


def read_lora(path: str | Path) -> tuple[dict, dict | None]:
    """(state dict, metadata) of a local Wan LoRA file as diffusers' WanPipeline reads it: its own format and the
    ones its loader converts (the original Wan / ComfyUI `diffusion_model.` keys with alphas, musubi-tuner's
    `lora_unet_`), with the adapter metadata diffusers saves in a safetensors header. Needs no peft: only
    `load_lora_weights` does, and the weights are applied by freeloc_dist.loras."""
    from diffusers import WanPipeline

    return WanPipeline.lora_state_dict(str(path), return_lora_metadata=True, local_files_only=True)


def _umt5_of(config: dict):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config.from_dict(config))


def clip_image_processor_class():
    """transformers' CLIPImageProcessor; without torchvision its PIL implementation, named directly (what
    transformers falls back to anyway, minus the warning line it prints on every rank)."""
    import importlib.util

    import transformers

    if importlib.util.find_spec("torchvision") is None and hasattr(transformers, "CLIPImageProcessorPil"):
        return transformers.CLIPImageProcessorPil
    return transformers.CLIPImageProcessor


def _clip_of(config: dict):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig.from_dict(config))


def weights_signature(model_dir: str | Path) -> list:
    """(file, size, mtime) of every weight file: weights replaced in place change it (resume fingerprint)."""
    root = Path(model_dir)
    return _weights_signature(root, weight_subfolders(_index_of(root)))


def load_scheduler(model_dir: str | Path):
    """The scheduler of a local diffusers directory (scheduler/scheduler_config.json; no weights read)."""
    return _load_scheduler(check_model_dir(model_dir))


def load_components(model_dir: str | Path, dtype: str | torch.dtype = "bfloat16",
                    device: str | torch.device = "cpu", placement=None) -> Components:
    """Load transformer, VAE, text encoder, tokenizer and scheduler from a local diffusers directory.

    The transformer and text encoder are loaded in `dtype`; the VAE stays in float32 (its decode is cheap
    next to sampling and lower precision visibly bands the output), and so does an image-to-video model's
    CLIP image encoder (image_encoder/, with its image_processor/), which runs once per render.
    `placement` (freeloc_dist.memory.Placement): the devices of the transformer, of the second expert and of the
    text encoder (None: not loaded); without one everything goes to `device`.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from .kind import declared_trained_frames

    root = check_model_dir(model_dir)
    dtype = resolve_dtype(dtype)

    def load(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # unreadable, truncated, refused (a pickle weights_only will not load): user files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"config error: model.path={str(root)!r}: cannot load {what}/: "
                              f"{type(e).__name__}: {first[:200]}") from None

    # The cheap parts first, so a garbage tokenizer.json fails before gigabytes of weights are read.
    tokenizer = load("tokenizer", AutoTokenizer.from_pretrained, root / "tokenizer", local_files_only=True)
    scheduler = load_scheduler(root)
    transformer = load("transformer", WanTransformer3DModel.from_pretrained, root, subfolder="transformer",
                       torch_dtype=dtype, local_files_only=True)
    vae = load("vae", AutoencoderKLWan.from_pretrained, root, subfolder="vae",
               torch_dtype=torch.float32, local_files_only=True)
    transformer_device = placement.transformer if placement is not None else device
    expert_2_device = placement.idle_expert if placement is not None else device
    text_device = placement.text_encoder if placement is not None else device
    text_encoder = None
    if text_device is not None:
        text_encoder = load("text_encoder", UMT5EncoderModel.from_pretrained, root / "text_encoder",
                            dtype=dtype, local_files_only=True).to(text_device).eval()
    index = json.loads((root / "model_index.json").read_text())
    transformer_2 = None
    if isinstance(index.get("transformer_2"), list) and index["transformer_2"][0] is not None:
        transformer_2 = load("transformer_2", WanTransformer3DModel.from_pretrained, root,
                             subfolder="transformer_2", torch_dtype=dtype, local_files_only=True)
        transformer_2 = transformer_2.to(expert_2_device).eval()
    image_encoder = image_processor = None
    if _named(index, _IMAGE_ENCODER):
        from transformers import CLIPVisionModel

        # float32, as the VAE (and as diffusers' Wan I2V examples load it): it runs once per render, on one image
        image_encoder = load(_IMAGE_ENCODER, CLIPVisionModel.from_pretrained, root / _IMAGE_ENCODER,
                             dtype=torch.float32, local_files_only=True).to(device).eval()
    if _named(index, _IMAGE_PROCESSOR):
        image_processor = load(_IMAGE_PROCESSOR, clip_image_processor_class().from_pretrained,
                               root / _IMAGE_PROCESSOR, local_files_only=True)
    return Components(
        transformer=transformer.to(transformer_device).eval(),
        vae=vae.to(device).eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        transformer_2=transformer_2,
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        trained_frames=declared_trained_frames(root, index),
        image_encoder=image_encoder,
        image_processor=image_processor,
    )


def save_components(parts: Components, out_dir: str | Path) -> Path:
    """Write the components in diffusers format (loadable by freeloc_dist.models.load_components)."""
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts.transformer.save_pretrained(out / "transformer")
    parts.vae.save_pretrained(out / "vae")
    parts.text_encoder.save_pretrained(out / "text_encoder")
    parts.tokenizer.save_pretrained(out / "tokenizer")
    parts.scheduler.save_pretrained(out / "scheduler")
    if parts.transformer_2 is not None:
        parts.transformer_2.save_pretrained(out / "transformer_2")
    if parts.image_encoder is not None:
        parts.image_encoder.save_pretrained(out / _IMAGE_ENCODER)
    if parts.image_processor is not None:
        parts.image_processor.save_pretrained(out / _IMAGE_PROCESSOR)
    conditioned = parts.transformer.config.in_channels != parts.transformer.config.out_channels
    index = {
        "_class_name": "WanImageToVideoPipeline" if conditioned else "WanPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", "WanTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLWan"],
        "text_encoder": ["transformers", "UMT5EncoderModel"],
        "tokenizer": ["transformers", type(parts.tokenizer).__name__],
        "scheduler": ["diffusers", type(parts.scheduler).__name__],
    }
    if conditioned:  # WanImageToVideoPipeline's optional CLIP components ([null, null] when absent, as diffusers)
        index[_IMAGE_ENCODER] = (["transformers", type(parts.image_encoder).__name__]
                                 if parts.image_encoder is not None else [None, None])
        index[_IMAGE_PROCESSOR] = (["transformers", type(parts.image_processor).__name__]
                                   if parts.image_processor is not None else [None, None])
    # WanPipeline's own config keys (diffusers writes them for Wan2.2), only where they are set
    if parts.transformer_2 is not None:
        index["transformer_2"] = ["diffusers", "WanTransformer3DModel"]
        index["boundary_ratio"] = parts.boundary_ratio
    if parts.expand_timesteps:
        index["expand_timesteps"] = True
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    from ..kind import write_declared_trained_frames

    write_declared_trained_frames(out, parts.trained_frames)  # ours, not diffusers': a test model's declared T
    return out
