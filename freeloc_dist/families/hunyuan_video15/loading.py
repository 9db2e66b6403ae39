"""Loading a HunyuanVideo 1.5 model from a local diffusers-format directory (HunyuanVideo15Pipeline's layout):
model_index.json, transformer/ (HunyuanVideo15Transformer3DModel), vae/ (AutoencoderKLHunyuanVideo15),
text_encoder/ (transformers Qwen2_5_VLTextModel) with tokenizer/, text_encoder_2/ (T5EncoderModel, ByT5) with
tokenizer_2/, scheduler/, and guider/ (the pipeline's ClassifierFreeGuidance; the render's scale is
sampling.guidance_scale, and a guider whose other settings the render does not apply is refused: `check_guider`).
Image-to-video adds image_encoder/ (SiglipVisionModel) and feature_extractor/ (SiglipImageProcessor). Nothing is
downloaded; the layout is checked first so a wrong path is one ConfigError naming the missing file. The tiny test
model (tiny.py) is saved and loaded by this same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from freeloc_dist.config import ConfigError
from freeloc_dist.models import Components, resolve_dtype

from ..kind import declared_trained_frames, write_declared_trained_frames
from ..layout import check_weights_against, has_weights, json_object, load_part
from ..layout import load_scheduler as layout_load_scheduler
from ..layout import weights_signature as layout_weights_signature
from .kind import I2V_PIPELINE, T2V_PIPELINE

_REQUIRED_CONFIGS = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                     "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                     "tokenizer_2": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
_I2V_CONFIGS = {"image_encoder": "config.json", "feature_extractor": "preprocessor_config.json"}
TEXT_WEIGHTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _is_i2v(root: Path) -> bool:
    return json.loads((root / "model_index.json").read_text()).get("_class_name") == I2V_PIPELINE


def _weight_subfolders(root: Path) -> tuple[str, ...]:
    return TEXT_WEIGHTS + (("image_encoder",) if _is_i2v(root) else ())


def check_model_dir(model_dir: str | Path) -> Path:
    root = Path(model_dir)
    where = f"config error: model.path={str(root)!r}"
    if not root.is_dir():
        raise ConfigError(f"{where}: model directory not found")
    if not (root / "model_index.json").is_file():
        raise ConfigError(f"{where}: missing model_index.json")
    required = {**_REQUIRED_CONFIGS, **(_I2V_CONFIGS if _is_i2v(root) else {})}
    for path in [root / sub / name for sub, name in required.items()]:
        if not path.is_file():
            raise ConfigError(f"{where}: missing {path.relative_to(root)}")
    for sub in _weight_subfolders(root):
        if not has_weights(root / sub):
            raise ConfigError(f"{where}: no weights in {sub}/")
    check_guider(root, where)
    return root


# The guider the render applies: plain classifier-free guidance on every step (freeloc_dist.guidance), its scale
# from sampling.guidance_scale. diffusers' formulations (original or not) are the same sum, so that key is free.
GUIDER_CONFIG = "guider_config.json"  # diffusers guiders' config file name
_GUIDER_CLASS = "ClassifierFreeGuidance"
_GUIDER_APPLIED = {"enabled": True, "guidance_rescale": 0.0, "start": 0.0, "stop": 1.0}


def check_guider(root: Path, where: str) -> None:
    """A model whose guider/ asks for what the render does not do (another guider class, guidance rescale, CFG on
    part of the schedule, guidance disabled) is refused: the stock pipeline would apply it and the render would
    silently not. No guider/ is the pipeline's own default (ClassifierFreeGuidance with these settings)."""
    path = root / "guider" / GUIDER_CONFIG
    if not path.is_file():
        return
    config = json_object(path)
    name = config.get("_class_name")
    if name != _GUIDER_CLASS:
        raise ConfigError(f"{where}: guider/{GUIDER_CONFIG}: {name!r} is not supported (the render applies "
                          f"{_GUIDER_CLASS})")
    for key, applied in _GUIDER_APPLIED.items():
        if key in config and config[key] != applied:
            raise ConfigError(f"{where}: guider/{GUIDER_CONFIG}: {key}={config[key]!r} is not applied by the render "
                              f"(it applies {key}={applied!r})")


def _builders():
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import (
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
        T5Config,
        T5EncoderModel,
    )

    return {"transformer": HunyuanVideo15Transformer3DModel.from_config,
            "vae": AutoencoderKLHunyuanVideo15.from_config,
            "text_encoder": lambda c: Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig.from_dict(c)),
            "text_encoder_2": lambda c: T5EncoderModel(T5Config.from_dict(c)),
            "image_encoder": lambda c: SiglipVisionModel(SiglipVisionConfig.from_dict(c))}


def check_weights_match_config(model_dir: str | Path) -> None:
    """Every safetensors tensor against the model its config.json builds on the meta device (shapes only)."""
    root = Path(model_dir)
    builders = _builders()
    for sub in _weight_subfolders(root):  # transformers leaves tied tensors out of its files
        check_weights_against(root, sub, builders[sub], all_tensors=sub in ("transformer", "vae"))


def weights_signature(model_dir: str | Path) -> list:
    root = Path(model_dir)
    return layout_weights_signature(root, _weight_subfolders(root))


def load_scheduler(model_dir: str | Path):
    return layout_load_scheduler(check_model_dir(model_dir))


def load_components(model_dir: str | Path, dtype="bfloat16", device="cpu", placement=None) -> Components:
    """Transformer and text encoders in `dtype`, the VAE and the image encoder in float32 (as the other
    families). `placement` (freeloc_dist.memory.Placement): where the transformer and the text encoders go (None:
    all on `device`); text encoders placed on None are not loaded."""
    from diffusers import AutoencoderKLHunyuanVideo15, HunyuanVideo15Transformer3DModel
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLTextModel, SiglipVisionModel, T5EncoderModel

    root = check_model_dir(model_dir)
    dtype = resolve_dtype(dtype)
    tokenizer = load_part(root, "tokenizer", AutoTokenizer.from_pretrained, root / "tokenizer", local_files_only=True)
    tokenizer_2 = load_part(root, "tokenizer_2", AutoTokenizer.from_pretrained, root / "tokenizer_2",
                            local_files_only=True)
    scheduler = load_scheduler(root)
    transformer = load_part(root, "transformer", HunyuanVideo15Transformer3DModel.from_pretrained, root,
                            subfolder="transformer", torch_dtype=dtype, local_files_only=True)
    vae = load_part(root, "vae", AutoencoderKLHunyuanVideo15.from_pretrained, root, subfolder="vae",
                    torch_dtype=torch.float32, local_files_only=True)
    text_device = placement.text_encoder if placement is not None else device
    text_encoder = text_encoder_2 = None
    if text_device is not None:
        text_encoder = load_part(root, "text_encoder", Qwen2_5_VLTextModel.from_pretrained, root / "text_encoder",
                                 dtype=dtype, local_files_only=True).to(text_device).eval()
        text_encoder_2 = load_part(root, "text_encoder_2", T5EncoderModel.from_pretrained, root / "text_encoder_2",
                                   dtype=dtype, local_files_only=True).to(text_device).eval()
    image_encoder = image_processor = None
    if _is_i2v(root):
        image_encoder = load_part(root, "image_encoder", SiglipVisionModel.from_pretrained, root / "image_encoder",
                                  dtype=torch.float32, local_files_only=True).to(device).eval()
        image_processor = load_part(root, "feature_extractor", AutoImageProcessor.from_pretrained,
                                    root / "feature_extractor", local_files_only=True)
    index = json.loads((root / "model_index.json").read_text())
    transformer_device = placement.transformer if placement is not None else device
    return Components(transformer=transformer.to(transformer_device).eval(), vae=vae.to(device).eval(),
                      text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      trained_frames=declared_trained_frames(root, index), text_encoder_2=text_encoder_2,
                      tokenizer_2=tokenizer_2, image_encoder=image_encoder, image_processor=image_processor)


_PARTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
_DIFFUSERS_PARTS = ("transformer", "vae", "scheduler", "guider")


def save_components(parts: Components, out_dir: str | Path, guider=None) -> Path:
    """Write the components in diffusers format (HunyuanVideo15Pipeline.from_pretrained, or the image-to-video
    pipeline's when an image encoder is there, reads it too). `guider`: the pipeline's guider component."""
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved = {name: getattr(parts, name) for name in _PARTS}
    if guider is not None:
        saved["guider"] = guider
    i2v = parts.image_encoder is not None
    if i2v:
        saved.update(image_encoder=parts.image_encoder, feature_extractor=parts.image_processor)
    for name, part in saved.items():
        part.save_pretrained(out / name)
    index = {"_class_name": I2V_PIPELINE if i2v else T2V_PIPELINE, "_diffusers_version": diffusers.__version__,
             **{name: ["diffusers" if name in _DIFFUSERS_PARTS else "transformers", type(part).__name__]
                for name, part in saved.items()}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_declared_trained_frames(out, parts.trained_frames)  # ours, not diffusers': a test model's declared T
    return out


# Key prefixes of LoRA formats other than diffusers' (ComfyUI / original checkpoints, kohya and musubi-tuner,
# peft's PeftModel): diffusers converts none of them for HunyuanVideo 1.5.
_OTHER_FORMATS = ("diffusion_model.", "lora_unet_", "lora_transformer_", "base_model.model.")


def read_lora(path: str | Path) -> tuple[dict, dict | None]:
    """(state dict with `transformer.` keys, metadata) of a local HunyuanVideo 1.5 LoRA file. diffusers 0.42 has
    no LoRA loader (nor converter) for HunyuanVideo15Pipeline, so only diffusers' own format is read, as the
    transformer's `load_lora_adapter` takes it: `transformer.`-prefixed keys (its default prefix; what a
    pipeline's `save_lora_weights` writes) or unprefixed keys (`prefix=None`; what the transformer's
    `save_lora_adapter` writes), with the adapter metadata in the safetensors header. Another format is refused
    (NotImplementedError naming it) rather than read as layers the model does not have."""
    from diffusers.loaders.lora_base import _fetch_state_dict

    state, metadata = _fetch_state_dict(str(path), weight_name=None, use_safetensors=True, local_files_only=True,
                                        cache_dir=None, force_download=False, proxies=None, token=None,
                                        revision=None, subfolder=None, user_agent=None, allow_pickle=True)
    if any(k.startswith("transformer.") for k in state):
        return state, metadata
    other = next((k for k in state if k.startswith(_OTHER_FORMATS)), None)
    if other is not None:
        raise NotImplementedError(
            f"not in diffusers' LoRA format ({other}); diffusers converts no other format for HunyuanVideo 1.5: "
            "give transformer.<layer>.lora_A/lora_B keys, as save_lora_weights or save_lora_adapter write them")
    return ({f"transformer.{k}": v for k, v in state.items()},
            None if metadata is None else {f"transformer.{k}": v for k, v in metadata.items()})
