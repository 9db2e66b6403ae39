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


def json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a component's config); ConfigError naming the file otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"config error: {path}: not readable JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_of(folder: Path) -> dict:
    return json_object(folder / "config.json")


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


def check_weights_against(root: Path, sub: str, build, *, all_tensors: bool) -> None:
    """The safetensors of `root/sub` against the model `build(config.json)` makes on the meta device (shapes only):
    a tensor the config does not build or builds in another shape, and (`all_tensors`: diffusers saves every
    tensor, transformers leaves tied ones out) one it builds that the weights lack, is one ConfigError."""
    import torch

    shapes = weight_shapes(root / sub)
    if shapes is None:
        return
    config = config_of(root / sub)
    try:
        with torch.device("meta"):
            model = build(config)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"config error: {root / sub / 'config.json'}: cannot build the model "
                          f"({type(e).__name__}: {first[:200]})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    where = f"config error: model.path={str(root)!r}: {sub}/config.json disagrees with its weights"
    for name, shape in shapes.items():
        if name not in expected:
            raise ConfigError(f"{where}: the weights have {name} {list(shape)}, the config builds no such tensor")
        if expected[name] != shape:
            raise ConfigError(f"{where}: {name} is {list(shape)} in the weights, {list(expected[name])} "
                              f"from the config")
    if all_tensors:
        missing = sorted(set(expected) - set(shapes))
        if missing:
            raise ConfigError(f"{where}: the config builds {missing[0]} (and {len(missing) - 1} more), "
                              f"missing from the weights")


def weights_signature(root: Path, subfolders) -> list:
    """(file, size, mtime) of every weight file of `subfolders`: weights replaced in place change it (resume)."""
    out = []
    for sub in subfolders:
        folder = root / sub
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.name.endswith((".safetensors", ".bin", ".json")):
                    st = p.stat()
                    out.append([f"{sub}/{p.name}", st.st_size, st.st_mtime_ns])
    return out


def load_scheduler(root: Path):
    """The scheduler of a checked diffusers directory (scheduler/scheduler_config.json; no weights read)."""
    scheduler_cls = scheduler_class(root / "scheduler" / "scheduler_config.json")
    try:
        return scheduler_cls.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    except Exception as e:  # an unreadable or refused config: a user file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"config error: model.path={str(root)!r}: cannot load scheduler/: "
                          f"{type(e).__name__}: {first[:200]}") from None


def load_part(root: Path, what: str, fn, *args, **kwargs):
    """`fn(*args, **kwargs)` loading component `what` of the model at `root`; any failure is one ConfigError line
    naming the component (a user's file, not a traceback)."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"config error: model.path={str(root)!r}: cannot load {what}/: "
                          f"{type(e).__name__}: {first[:200]}") from None
