"""Loading a HunyuanVideo model from a local diffusers-format directory (HunyuanVideoPipeline's layout):
model_index.json, transformer/ (HunyuanVideoTransformer3DModel), vae/ (AutoencoderKLHunyuanVideo), text_encoder/
(transformers LlamaModel) with tokenizer/, text_encoder_2/ (CLIPTextModel) with tokenizer_2/, and scheduler/.
Nothing is downloaded (every from_pretrained is local_files_only); the layout is checked first so a wrong path is
one ConfigError naming the missing file. The tiny test model (tiny.py) is saved and loaded by this same code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from freeloc_dist.config import ConfigError
from freeloc_dist.models import Components, resolve_dtype

from ..kind import declared_trained_frames, write_declared_trained_frames
from ..layout import check_weights_against, has_weights
from ..layout import load_scheduler as layout_load_scheduler
from ..layout import weights_signature as layout_weights_signature

_REQUIRED_CONFIGS = {"transformer": "config.json", "vae": "config.json", "text_encoder": "config.json",
                     "text_encoder_2": "config.json", "tokenizer": "tokenizer_config.json",
                     "tokenizer_2": "tokenizer_config.json", "scheduler": "scheduler_config.json"}
WEIGHT_SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def _where(root: Path) -> str:
    return f"config error: model.path={str(root)!r}"


def check_model_dir(model_dir: str | Path) -> Path:
    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"{_where(root)}: model directory not found")
    for path in [root / "model_index.json"] + [root / sub / name for sub, name in _REQUIRED_CONFIGS.items()]:
        if not path.is_file():
            raise ConfigError(f"{_where(root)}: missing {path.relative_to(root)}")
    for sub in WEIGHT_SUBFOLDERS:
        if not has_weights(root / sub):
            raise ConfigError(f"{_where(root)}: no weights in {sub}/")
    return root


def _builders():
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    return {"transformer": HunyuanVideoTransformer3DModel.from_config, "vae": AutoencoderKLHunyuanVideo.from_config,
            "text_encoder": lambda c: LlamaModel(LlamaConfig.from_dict(c)),
            "text_encoder_2": lambda c: CLIPTextModel(CLIPTextConfig.from_dict(c))}


def check_weights_match_config(model_dir: str | Path) -> None:
    """Every safetensors tensor against the model its config.json builds on the meta device (shapes only)."""
    root = Path(model_dir)
    for sub, build in _builders().items():  # transformers leaves tied tensors out of the text encoders' files
        check_weights_against(root, sub, build, all_tensors=sub in ("transformer", "vae"))


def weights_signature(model_dir: str | Path) -> list:
    return layout_weights_signature(Path(model_dir), WEIGHT_SUBFOLDERS)


def load_scheduler(model_dir: str | Path):
    return layout_load_scheduler(check_model_dir(model_dir))


def load_components(model_dir: str | Path, dtype="bfloat16", device="cpu", placement=None) -> Components:
    """Transformer and text encoders in `dtype`, the VAE in float32 (as the other families). `placement`
    (freeloc_dist.memory.Placement): where the transformer and the text encoders go (None: all on `device`); text
    encoders placed on None are not loaded."""
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from transformers import AutoTokenizer, CLIPTextModel, LlamaModel

    root = check_model_dir(model_dir)
    dtype = resolve_dtype(dtype)

    def load(what, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{_where(root)}: cannot load {what}/: {type(e).__name__}: {first[:200]}") from None

    tokenizer = load("tokenizer", AutoTokenizer.from_pretrained, root / "tokenizer", local_files_only=True)
    tokenizer_2 = load("tokenizer_2", AutoTokenizer.from_pretrained, root / "tokenizer_2", local_files_only=True)
    scheduler = load_scheduler(root)
    transformer = load("transformer", HunyuanVideoTransformer3DModel.from_pretrained, root, subfolder="transformer",
                       torch_dtype=dtype, local_files_only=True)
    vae = load("vae", AutoencoderKLHunyuanVideo.from_pretrained, root, subfolder="vae", torch_dtype=torch.float32,
               local_files_only=True)
    text_device = placement.text_encoder if placement is not None else device
    text_encoder = text_encoder_2 = None
    if text_device is not None:
        text_encoder = load("text_encoder", LlamaModel.from_pretrained, root / "text_encoder", dtype=dtype,
                            local_files_only=True).to(text_device).eval()
        text_encoder_2 = load("text_encoder_2", CLIPTextModel.from_pretrained, root / "text_encoder_2", dtype=dtype,
                              local_files_only=True).to(text_device).eval()
    index = json.loads((root / "model_index.json").read_text())
    transformer_device = placement.transformer if placement is not None else device
    return Components(transformer=transformer.to(transformer_device).eval(), vae=vae.to(device).eval(),
                      text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                      trained_frames=declared_trained_frames(root, index), text_encoder_2=text_encoder_2,
                      tokenizer_2=tokenizer_2)


def save_components(parts: Components, out_dir: str | Path) -> Path:
    """Write the components in diffusers format (HunyuanVideoPipeline.from_pretrained reads it too)."""
    import diffusers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        getattr(parts, name).save_pretrained(out / name)
    library = {"transformer": "diffusers", "vae": "diffusers", "scheduler": "diffusers"}
    index = {"_class_name": "HunyuanVideoPipeline", "_diffusers_version": diffusers.__version__,
             **{name: [library.get(name, "transformers"), type(getattr(parts, name)).__name__]
                for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                             "scheduler")}}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_declared_trained_frames(out, parts.trained_frames)  # ours, not diffusers': a test model's declared T
    return out


def read_lora(path: str | Path) -> tuple[dict, dict | None]:
    """(state dict, metadata) of a local HunyuanVideo LoRA file as diffusers' HunyuanVideoPipeline reads it
    (`lora_state_dict`, what `load_lora_weights` applies): diffusers' own format (`transformer.` keys, with the
    adapter metadata `save_lora_weights` writes) and the original HunyuanVideo format (`diffusion_model.` keys,
    fused `img_attn_qkv` / `linear1`), which diffusers converts. Needs no peft; freeloc_dist.loras applies it."""
    from diffusers import HunyuanVideoPipeline

    return HunyuanVideoPipeline.lora_state_dict(str(path), return_lora_metadata=True, local_files_only=True)
