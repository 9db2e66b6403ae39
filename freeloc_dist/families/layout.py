"""What every family's diffusers-format model directory shares, read without loading a model: whether a
folder holds weights, the tensor shapes in its safetensors headers, a component's config.json, and the diffusers
scheduler class scheduler_config.json names. Each family's loading module builds its checks from these.
"""

from __future__ import annotations

import json
from pathlib import Path

from freeloc_dist.config import ConfigError


def has_weights(folder: Path) -> bool:
    return any(p.name.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json"))
               for p in folder.iterdir())


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} from the safetensors headers in `folder` (no tensor is read); None when the
    weights are not all safetensors (.bin cannot be inspected without unpickling)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files or any(p.name.endswith(".bin") for p in folder.iterdir()):
        return None
    shapes = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # a truncated or garbage header
            raise ConfigError(f"config error: {path}: not a readable safetensors file ({type(e).__name__})") from None
    return shapes


def config_of(folder: Path) -> dict:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config error: {folder / 'config.json'}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {folder / 'config.json'}: expected a JSON object")
    return data


def scheduler_class(config_path: Path):
    import diffusers
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    try:
        name = json.loads(config_path.read_text())["_class_name"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"config error: {config_path}: no _class_name in the scheduler config") from None
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise ConfigError(f"config error: {config_path}: {name!r} is not a diffusers scheduler")
    return cls
