"""Loading a model from a local diffusers-format directory, whatever its family: the front door that
launch/, the render loop and probing call. The directory's family (freeloc_dist.family.model_family, from
model_index.json) does the work (freeloc_dist.families.<family>.loading); `Components` is what every family
returns. Nothing here ever downloads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from freeloc_dist.config import ConfigError

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Components:
    transformer: Any  # the family's diffusers transformer
    vae: Any  # the family's diffusers VAE (float32)
    text_encoder: Any  # the family's transformers text encoder
    tokenizer: Any  # transformers tokenizer
    scheduler: Any  # diffusers flow-matching scheduler (a template: sampling copies it per render)
    # two-expert models: the low-noise expert, used for t < boundary_ratio * num_train_timesteps (experts.py)
    transformer_2: Any = None
    boundary_ratio: float | None = None
    expand_timesteps: bool = False  # per-token timesteps
    # Latent frames the model was trained on, when it is not the family's (tiny test models; freeloc_dist.family)
    trained_frames: int | None = None
    # image encoder and its processor, for families and models that encode the conditioning image (else None)
    image_encoder: Any = None
    image_processor: Any = None
    # a second text encoder and its tokenizer, for families that encode the prompt twice (HunyuanVideo's CLIP)
    text_encoder_2: Any = None
    tokenizer_2: Any = None

    def experts(self) -> list:
        """The transformers of this model, high-noise expert first."""
        return [t for t in (self.transformer, self.transformer_2) if t is not None]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"config error: model.dtype={dtype!r}: must be one of: {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def _family(model_dir: str | Path):
    """The family of the model directory; layout errors first, as ConfigError (one line, exit 2)."""
    from freeloc_dist.family import ModelKindError, model_family

    root = Path(model_dir)
    if not root.is_dir():
        raise ConfigError(f"config error: model.path={str(root)!r}: model directory not found")
    if not (root / "model_index.json").is_file():
        raise ConfigError(f"config error: model.path={str(root)!r}: missing model_index.json")
    try:
        json.loads((root / "model_index.json").read_text())
    except (OSError, ValueError):
        raise ConfigError(f"config error: model.path={str(root)!r}: model_index.json is not readable JSON") from None
    try:
        return model_family(root)
    except ModelKindError as e:
        raise ConfigError(f"config error: model.path={str(root)!r}: {e}") from None


def check_model_dir(model_dir: str | Path) -> Path:
    """Verify the diffusers layout of `model_dir` without loading anything; returns it as a Path."""
    return _family(model_dir).check_model_dir(model_dir)


def check_weights_match_config(model_dir: str | Path) -> None:
    """Every weight tensor against the model its config builds (shapes only): one-line ConfigError."""
    _family(model_dir).check_weights_match_config(model_dir)


def weights_signature(model_dir: str | Path) -> list:
    """(file, size, mtime) of every weight file: weights replaced in place change it (resume fingerprint)."""
    return _family(model_dir).weights_signature(model_dir)


def load_scheduler(model_dir: str | Path):
    """The model's diffusers scheduler alone, from its config (no weights): before loading, which timesteps run."""
    return _family(model_dir).load_scheduler(model_dir)


def load_components(model_dir: str | Path, dtype: str | torch.dtype = "bfloat16",
                    device: str | torch.device = "cpu", placement=None) -> Components:
    """Every component of the model in `model_dir` (a local diffusers directory), loaded by its family.

    The transformer(s) and text encoder are loaded in `dtype`; the VAE and an image encoder stay in float32.
    `placement` (freeloc_dist.memory.Placement): where the memory settings put the weights (None: on `device`)."""
    return _family(model_dir).load_components(model_dir, dtype, device, placement)
