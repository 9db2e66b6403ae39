"""LoRAs of a render (`model.loras`): read and checked on every rank before any weight loads, then applied to the
loaded transformers, fused (each update added into its weight once) or unfused (computed beside it on every call).

A LoRA updates a linear layer W [out, in] by  s c B A  (A = lora_A [r, in], B = lora_B [out, r]; an optional
lora_B.bias [out] adds s c b to the layer's bias), where s is the user's `scale` and c the adapter's own scaling:
alpha / r (alpha / sqrt(r) for rsLoRA), from the adapter metadata diffusers saves with a file, and 1 without it
(diffusers' rule: alpha = r). Other formats (Wan's original and musubi ones) carry their alphas in the file and
diffusers' converters fold them into A and B. That is exactly what diffusers computes through peft
(`load_lora_weights` / `load_lora_adapter`, `set_adapters` weights, `fuse_lora`). We apply it ourselves: only
loading through diffusers needs peft (reading and converting a file does not); no peft layer is left in the
model for FreeLOC, the parallel engine or torch.compile to meet; and fusing happens in float32 whatever the
model's dtype.

Reading is the family's (Family.read_lora: diffusers' converters of the family's LoRA formats); which layers a
LoRA may touch, the model's linear layers, is checked against its configs on the meta device
(Family.transformer_shapes), so a LoRA for another model is one line, exit 2, before anything loads.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .families.kind import EXPERT_NAMES

PREFIX = "transformer."  # diffusers' pipelines name a LoRA's transformer keys after the component
_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_B.bias")
# model.loras[].expert -> the components it goes into (unset: the first, as diffusers' load_lora_weights)
EXPERTS = {None: EXPERT_NAMES[:1], "high": EXPERT_NAMES[:1], "low": EXPERT_NAMES[1:], "both": EXPERT_NAMES}


class LoraError(UserError, ValueError):
    """A LoRA that cannot be used with this model; the message is one line naming the config entry."""


@dataclass(frozen=True)
class Update:
    """One layer's low-rank update."""

    down: Any  # lora_A [r, in]
    up: Any  # lora_B [out, r]
    bias: Any  # lora_B.bias [out] or None
    scaling: float  # the adapter's alpha / r (before the user's scale)


@dataclass(frozen=True)
class Lora:
    where: str  # "model.loras[i]", for messages
    path: Path
    scale: float
    experts: tuple[str, ...]  # component names: transformer, transformer_2
    updates: dict[str, Update]  # by layer (module) name
    digest: str  # sha256 of the file

    def record(self) -> dict:
        """What the sidecar says of it."""
        return {"path": str(self.path), "sha256": self.digest, "scale": self.scale, "experts": list(self.experts)}


@functools.lru_cache(maxsize=64)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's content (cached while its size and mtime stay)."""
    st = Path(path).stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def fingerprint_key(model_cfg) -> list:
    """What the LoRAs add to the resume fingerprint: each file's content (not its path), scale and expert, and
    whether they are fused (fusing rounds the weights once)."""
    return [[file_digest(lora.path), lora.scale, lora.expert] for lora in model_cfg.loras] + [model_cfg.fuse_loras]


# ---------------------------------------------------------------------------------------- reading
def read_loras(model_cfg, family, model_dir: Path, kind) -> tuple[Lora, ...]:
    """Every LoRA of the config, read and checked against the model (its family and ModelKind); LoraError."""
    shapes: dict[str, dict] = {}
    loras = []
    for i, spec in enumerate(model_cfg.loras):
        where = f"model.loras[{i}]"
        if spec.expert is not None and not kind.two_experts:
            raise LoraError(f"{where}.expert={spec.expert!r}: the model at {model_dir} has one transformer (no "
                            "second expert); leave expert out")
        lora = read_lora(family, spec.path, where)
        experts = EXPERTS[spec.expert]
        for expert in experts:
            if expert not in shapes:
                shapes[expert] = family.transformer_shapes(model_dir, expert)
            check_fits(lora, shapes[expert], f"{where}={str(spec.path)!r}", expert)
        loras.append(Lora(where=where, path=spec.path, scale=spec.scale, experts=experts, updates=lora,
                          digest=file_digest(spec.path)))
    return tuple(loras)


def read_lora(family, path: Path, where: str) -> dict[str, Update]:
    """The updates of one LoRA file, by layer name (LoraError: missing, unreadable, not a LoRA)."""
    label = f"{where}={str(path)!r}"
    if not path.exists():
        raise LoraError(f"{label}: LoRA file not found")
    if path.is_dir():
        raise LoraError(f"{label}: is a directory; give the LoRA file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise LoraError(f"{label}: cannot read ({e.strerror})") from None
    try:
        state, metadata = family.read_lora(path)
    except NotImplementedError as e:
        raise LoraError(f"{label}: {e}") from None
    except Exception as e:  # not safetensors nor a torch file, a format the converters refuse, ...
        text = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise LoraError(f"{label}: not a LoRA file diffusers reads ({type(e).__name__}"
                        + (f": {text})" if text else ")")) from None
    return updates_of(state, metadata, label)


def updates_of(state: dict, metadata: dict | None, label: str) -> dict[str, Update]:
    """{layer: Update} from a LoRA state dict in diffusers' naming (component-prefixed) and its metadata."""
    from diffusers.utils import convert_unet_state_dict_to_peft

    odd = next((k for k in state if "lora" not in k), None)
    if odd is not None:  # diffusers' load_lora_weights refuses these too
        raise LoraError(f"{label}: not a LoRA ({odd} is not a LoRA weight)")
    other = next((k for k in state if not k.startswith(PREFIX)), None)
    if other is not None and any(k.startswith(PREFIX) for k in state):  # diffusers' loaders drop these silently
        raise LoraError(f"{label}: also holds LoRA weights of another component ({other}), which the render does "
                        "not apply (only the transformer's); remove them from the file")
    state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not state:
        raise LoraError(f"{label}: holds no LoRA weights for the transformer (keys named {PREFIX}...)")
    if any("lora_magnitude_vector" in k for k in state) or any(".lokr_" in k for k in state):
        raise LoraError(f"{label}: a DoRA or LoKr adapter; only plain LoRA is supported")
    if "lora_A" not in next(iter(state)):  # older diffusers naming (lora.down / lora.up), as diffusers converts it
        state = convert_unet_state_dict_to_peft(state)
    settings = {k[len(PREFIX):]: v for k, v in (metadata or {}).items() if k.startswith(PREFIX)}
    if settings.get("use_dora") or settings.get("fan_in_fan_out"):
        raise LoraError(f"{label}: its metadata asks for use_dora or fan_in_fan_out, which are not supported")
    layers: dict[str, dict] = {}
    for key, tensor in state.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            raise LoraError(f"{label}: {PREFIX}{key} is not a LoRA weight this engine applies (lora_A.weight, "
                            "lora_B.weight or lora_B.bias)")
        layers.setdefault(key[: -len(suffix)], {})[suffix] = tensor
    updates = {}
    for name, parts in layers.items():
        down, up = parts.get(".lora_A.weight"), parts.get(".lora_B.weight")
        if down is None or up is None or down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraError(f"{label}: {name}: needs lora_A [r, in] and lora_B [out, r] (found "
                            f"{_shape(down)} and {_shape(up)})")
        bad = next((part for part, t in parts.items() if not t.isfinite().all()), None)
        if bad is not None:  # it would only surface as NaN latents after the whole render
            raise LoraError(f"{label}: {name}{bad} holds NaN or infinite values")
        updates[name] = Update(down=down, up=up, bias=parts.get(".lora_B.bias"),
                               scaling=_scaling(name, down.shape[0], settings, label))
    return updates


def _shape(t) -> str:
    return "none" if t is None else str(list(t.shape))


def _pattern(patterns: dict, name: str):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a layer name it ends (or, with ^, starts) with."""
    for key, value in (patterns or {}).items():
        if re.match(key if key.startswith("^") else rf"(.*\.)?({key})$", name):
            return value
    return None


def _scaling(name: str, rank: int, settings: dict, label: str) -> float:
    """The adapter's scaling of one layer: alpha / r (rsLoRA: alpha / sqrt(r)); 1 without metadata."""
    if not settings:
        return 1.0
    r = _pattern(settings.get("rank_pattern"), name) or settings.get("r", rank)
    if r != rank:
        raise LoraError(f"{label}: {name}: its metadata says rank {r}, its lora_A has rank {rank}")
    alpha = _pattern(settings.get("alpha_pattern"), name) or settings.get("lora_alpha", r)
    return float(alpha) / (math.sqrt(r) if settings.get("use_rslora") else r)


def check_fits(updates: dict[str, Update], shapes: dict, label: str, expert: str) -> None:
    """Every updated layer is a linear layer of the expert (`shapes`: its linear layers' parameters) with the
    update's shape; else LoraError."""
    for name, u in updates.items():
        weight = shapes.get(f"{name}.weight")  # linear layers only (Family.transformer_shapes)
        if weight is None:
            raise LoraError(f"{label}: not a LoRA for this model: it updates {name}, which is not a linear layer "
                            f"of {expert}")
        lora_shape = (u.up.shape[0], u.down.shape[1])
        if tuple(weight) != lora_shape:
            raise LoraError(f"{label}: not a LoRA for this model: {name} is {list(weight)} in {expert}, the "
                            f"LoRA's update is {list(lora_shape)}")
        if u.bias is not None and (f"{name}.bias" not in shapes or tuple(u.bias.shape) != (weight[0],)):
            raise LoraError(f"{label}: not a LoRA for this model: its bias of {name} does not fit {expert}")


# ---------------------------------------------------------------------------------------- applying
def apply_loras(components, loras, *, fuse: bool = True) -> list:
    """Add every LoRA's updates to the loaded transformers (components: freeloc_dist.models.Components), in
    order, before FreeLOC and the engine are installed. Returns the forward-hook handles (unfused only)."""
    import torch

    handles = []
    for lora in loras:
        for expert in lora.experts:
            transformer = getattr(components, expert)
            for name, u in lora.updates.items():
                layer = transformer.get_submodule(name)
                assert isinstance(layer, torch.nn.Linear), f"{name} is a {type(layer).__name__} (checked before)"
                factor = lora.scale * u.scaling
                if fuse:
                    fuse_update(layer, u, factor)
                else:
                    handles.append(layer.register_forward_hook(_unfused(layer, u, factor)))
    return handles


def fuse_update(layer, u: Update, factor: float) -> None:
    """W += factor B A (and b += factor lora_B.bias), computed in float32 and rounded once to W's dtype."""
    import torch

    with torch.no_grad():
        w = layer.weight
        delta = u.up.to(w.device, torch.float32) @ u.down.to(w.device, torch.float32)
        w.copy_((w.float() + factor * delta).to(w.dtype))
        if u.bias is not None:
            b = layer.bias
            b.copy_((b.float() + factor * u.bias.to(b.device, torch.float32)).to(b.dtype))


def _unfused(layer, u: Update, factor: float):
    """A forward hook adding factor (B (A x) + lora_B.bias) to the layer's output, as peft's LoRA layer does."""
    import torch.nn.functional as F

    w = layer.weight
    down, up = u.down.to(w.device, w.dtype), u.up.to(w.device, w.dtype)
    bias = u.bias.to(w.device, w.dtype) if u.bias is not None else None

    def hook(module, args, output):
        return output + factor * F.linear(F.linear(args[0].to(down.dtype), down), up, bias)

    return hook
