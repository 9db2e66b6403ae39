"""The typed configuration of one render, read from configs/*.yaml and validated before any heavy work.

One tree of frozen, keyword-only dataclasses (RenderConfig at the root). `load_render_config` reads a YAML
file, applies overrides (dotted keys such as "video.frames", as the command line gives them), and validates
every field against the dataclass type hints plus the small table of value checks below. Every user error
is a `ConfigError` whose message is one line naming the field by its dotted path, e.g.
`config error: video.frames=64: must be 4k+1 (e.g. 61 or 65)`. Relative paths written in a config file
resolve against the repository root, so a config means the same thing from any working directory.
This module does not need torch, so it is cheap to validate a config before any heavy import.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .choices import (
    ATTENTION_BACKENDS,
    CACHES,
    COMPILE_MODES,
    EXPERT_PLACES,
    LORA_EXPERTS,
    SCHEDULER_CHOICES,
    STRATEGY_CHOICES,
    TEXT_ENCODER_PLACES,
)
from .errors import UserError
from .families.kind import FRAMES_RULE
from .yamlio import load_yaml, yaml_problem

REPO_ROOT = Path(__file__).resolve().parent.parent

Dtype = Literal["float32", "bfloat16", "float16"]
Compile = Literal[COMPILE_MODES]
Backend = Literal[ATTENTION_BACKENDS]  # names from freeloc_dist.choices, which the registries match
Strategy = Literal[STRATEGY_CHOICES]
Scheduler = Literal[SCHEDULER_CHOICES]
LoraExpert = Literal[LORA_EXPERTS]
TextEncoderPlace = Literal[TEXT_ENCODER_PLACES]
ExpertPlace = Literal[EXPERT_PLACES]


class ConfigError(UserError, ValueError):
    """A user error in a config file, an override or a command-line flag. The message is one line."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """One LoRA (freeloc_dist.loras): a local file in a format diffusers reads for the model's family
    (Family.read_lora: Wan's and HunyuanVideo's converters; HunyuanVideo 1.5: diffusers' own format)."""

    path: Path
    scale: float = 1.0  # multiplies the LoRA's update (its own alpha / rank applies as well)
    # two-expert models (Wan2.2 A14B): high (transformer), low (transformer_2) or both; unset: the first
    # transformer, as diffusers' load_lora_weights. One-expert models take no expert.
    expert: LoraExpert | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    path: Path  # local diffusers-format directory (model_index.json, transformer/, vae/, ...)
    dtype: Dtype = "bfloat16"  # transformer and text encoder; the VAE always runs in float32
    # torch.compile of the transformer: blocks = compile_repeated_blocks(fullgraph=True) (one graph
    # per block shape, compiled once per video length), full = torch.compile(transformer)
    compile: Compile = "none"
    loras: tuple[LoraConfig, ...] = ()  # applied in order; their updates add up
    # fused: each update is added into its weight once, before sampling (no cost per step); unfused: kept
    # beside the weights and computed on every call (the base weights stay bitwise untouched)
    fuse_loras: bool = True


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    height: int
    width: int
    frames: int  # output video frames; Wan's VAE needs 4k+1 (k+1 latent frames)
    fps: int = 16


@dataclass(frozen=True, kw_only=True)
class SamplingConfig:
    steps: int = 50
    guidance_scale: float = 5.0  # <= 1 runs the conditional pass only
    # two-expert models: the low-noise expert's (default: guidance_scale); guidance_scale decides whether the
    # unconditional pass runs for both experts (diffusers' rule), so a value <= 1 here still combines with it
    guidance_scale_2: float | None = None
    # guidance-embedded models (HunyuanVideo): guidance_scale is embedded in the model's input, and a separate
    # unconditional pass (true classifier-free guidance with negative_prompt) runs only when this is > 1
    true_cfg_scale: float = 1.0
    shift: float = 3.0  # flow-matching sigma shift
    scheduler: Scheduler = "model"  # the model's own, or euler / unipc / dpm++ (freeloc_dist.schedulers)
    seed: int = 0
    negative_prompt: str = ""
    max_text_tokens: int = 512


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Multi-process settings; world size comes from torchrun (WORLD_SIZE), sp = world / cfg_degree."""

    cfg_degree: int = 1  # 2: conditional and unconditional passes run on two rank groups
    strategy: Strategy = "auto"  # auto: per layer kind, the cheapest by bytes moved (DESIGN 7)
    timeout_s: float = 600.0  # a collective waiting longer than this fails every rank


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Resumable renders (freeloc_dist.checkpoint). A preemption signal always writes a checkpoint."""

    every: int = 0  # also write one every `every` sampling steps (0: only on SIGTERM / SIGUSR1)
    path: Path | None = None  # default: next to the output, `.<output name>.ckpt`


@dataclass(frozen=True, kw_only=True)
class MemoryConfig:
    """Where the weights wait (freeloc_dist.memory); none of these changes the latents, so the resume fingerprint
    ignores them (freeloc_dist.checkpoint)."""

    text_encoder: TextEncoderPlace = "gpu"  # gpu (the render device) | cpu | rank0 (one rank encodes, broadcasts)
    # two-expert models: offload = the idle expert waits in host memory, resident = on the device; default (null):
    # offload, or resident with shard_weights (sharded experts hold 1/sp each; the two do not combine)
    experts: ExpertPlace | None = None
    shard_weights: bool = False  # the transformer's blocks sharded over the sp group (FSDP2), gathered per block


@dataclass(frozen=True, kw_only=True)
class RenderConfig:
    model: ModelConfig
    video: VideoConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    profile: Path | None = None  # FreeLOC profile YAML; None renders with stock attention
    profile_2: Path | None = None  # two-expert models (Wan2.2 A14B): the low-noise expert's profile
    attention_backend: Backend = "sdpa"
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    prompt: str = ""
    # image-to-video models: the first frame (PNG/JPEG; fitted to video.height x video.width) and, for
    # first-last-frame models (Wan2.1 FLF2V), the last frame (freeloc_dist.images)
    image: Path | None = None
    last_image: Path | None = None
    output: Path = Path("outputs/render.mp4")
    # a prompt schedule (YAML list of {at, prompt, ...}) that replaces `prompt` (freeloc_dist.storyboard)
    storyboard: Path | None = None
    # one of diffusers' caching hooks: {name: first_block, threshold: 0.1}; the other keys are that cache's
    # settings (freeloc_dist.caches checks them)
    cache: dict | None = None

    @property
    def latent_frames(self) -> int:
        return latent_frames(self.video.frames)


def latent_frames(frames: int) -> int:
    """Latent frames of a video of `frames` output frames (the configs' frames rule: 4k+1 -> k+1)."""
    return FRAMES_RULE.latent_frames(frames)


def frames_for_seconds(seconds: float, fps: int) -> int:
    """The valid frame count (4k+1, at least 1) nearest to `seconds` of video at `fps` (ValueError when
    seconds x fps is not a finite number)."""
    return FRAMES_RULE.nearest(seconds, fps)


def _positive_multiple_of_16(v: int) -> bool:
    return v > 0 and v % 16 == 0


# Upper bounds on settings whose absurd values would otherwise fail deep inside torch (steps: 10**12 allocates
# the timestep table). Frames and size have none here: their bound is memory (preflight, the planner).
MAX_STEPS = 10_000
MAX_TEXT_TOKENS = 4096
MAX_FPS = 1000
# Classifier-free guidance: Wan's scales are 3-8; past 100 the combine neg + g (pos - neg) only amplifies the
# difference of the two passes until the latents overflow (1e308 gave NaN latents after every step had run).
MAX_GUIDANCE = 100.0
_GUIDANCE_RANGE = f"must be a finite number >= 0 and <= {MAX_GUIDANCE:g}"
# LoRA scales are about -2 to 4; the update is added `scale` times into the layer, and 1e30 gave NaN latents only
# after every step had run (a line naming no LoRA)
MAX_LORA_SCALE = 100.0

# Value checks by dotted path: (predicate, message or message(value)). Types are checked from the hints.
_CHECKS: dict[str, tuple[typing.Callable[[Any], bool], str | typing.Callable[[Any], str]]] = {
    "video.height": (_positive_multiple_of_16, "must be a positive multiple of 16"),
    "video.width": (_positive_multiple_of_16, "must be a positive multiple of 16"),
    "video.frames": (FRAMES_RULE.valid, FRAMES_RULE.problem),
    "video.fps": (lambda v: 1 <= v <= MAX_FPS, f"must be >= 1 and <= {MAX_FPS}"),
    "sampling.steps": (lambda v: 1 <= v <= MAX_STEPS, f"must be >= 1 and <= {MAX_STEPS}"),
    "sampling.guidance_scale": (lambda v: 0 <= v <= MAX_GUIDANCE, _GUIDANCE_RANGE),
    "sampling.guidance_scale_2": (lambda v: 0 <= v <= MAX_GUIDANCE, _GUIDANCE_RANGE),
    "sampling.true_cfg_scale": (lambda v: 0 <= v <= MAX_GUIDANCE, _GUIDANCE_RANGE),
    "sampling.shift": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"),
    "sampling.seed": (lambda v: 0 <= v < 2**63, "must be in [0, 2**63)"),
    "sampling.max_text_tokens": (lambda v: 1 <= v <= MAX_TEXT_TOKENS, f"must be >= 1 and <= {MAX_TEXT_TOKENS}"),
    "output": (lambda v: v.suffix.lower() == ".mp4", "must be an .mp4 path"),
    "parallel.cfg_degree": (lambda v: v in (1, 2), "must be 1 or 2"),
    "parallel.timeout_s": (lambda v: math.isfinite(v) and v > 0, "must be a finite number > 0"),
    "model.loras[].scale": (lambda v: abs(v) <= MAX_LORA_SCALE, f"must be a number in [-{MAX_LORA_SCALE:g}, "
                                                                   f"{MAX_LORA_SCALE:g}]"),
    "checkpoint.every": (lambda v: v >= 0, "must be >= 0 (0: checkpoint only on preemption)"),
    "cache": (lambda v: v.get("name") in CACHES, f"needs name: one of {', '.join(CACHES)}"),
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(where: str, value: Any, message: str) -> typing.NoReturn:
    raise ConfigError(f"config error: {where}={_show(value)}: {message}")


def _convert(where: str, hint: Any, value: Any, checks: Mapping = _CHECKS) -> Any:
    """Check `value` against a type hint and return it converted (int -> float, str -> Path)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(where, inner, value, checks)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices or not isinstance(value, str):
            _fail(where, value, f"must be one of: {', '.join(choices)}")
        return value
    if origin is tuple:  # tuple[X, ...] from a YAML list
        inner, ellipsis = typing.get_args(hint)
        assert ellipsis is Ellipsis, f"only tuple[X, ...] is supported ({where})"
        if not isinstance(value, (list, tuple)):
            _fail(where, value, f"expected a list, got {type(value).__name__}")
        return tuple(_convert(f"{where}[{i}]", inner, x, checks) for i, x in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(where, hint, value, checks)
    if hint is dict:  # settings passed on as they are (their owner checks them)
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            _fail(where, value, "expected a mapping")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            _fail(where, value, "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(where, value, f"expected an integer, got {type(value).__name__}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(where, value, f"expected a number, got {type(value).__name__}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            _fail(where, value, f"expected a string, got {type(value).__name__}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            _fail(where, value, "expected a path")
        if "\0" in str(value):
            _fail(where, value, "a path cannot contain a NUL byte")
        path = Path(value).expanduser()
        return path if path.is_absolute() else REPO_ROOT / path
    raise AssertionError(f"unsupported config type {hint!r} at {where}")


def build_config(cls: type, raw: Any, *, where: str = "", checks: Mapping = _CHECKS) -> Any:
    """Validate a mapping against the config dataclass `cls` (types from its hints, values from `checks`, a
    table {dotted path: (predicate, message)}); `where` is its dotted path ("" at the root). The one
    validator of every config tree in the package (render configs here, probing settings)."""
    return _build(where, cls, raw, checks)


def _build(where: str, cls: type, raw: Any, checks: Mapping = _CHECKS) -> Any:
    """Validate a mapping against dataclass `cls`; `where` is its dotted path ("" at the root)."""
    prefix = f"{where}." if where else ""
    if not isinstance(raw, Mapping):
        _fail(where or "<root>", raw, "expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise ConfigError(
                f"config error: {prefix}{key}: unknown key (expected one of: {', '.join(fields)})"
            )
    values = {}
    for name, f in fields.items():
        path = prefix + name
        if name not in raw:
            no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if no_default:
                raise ConfigError(f"config error: {path}: missing required field")
            continue
        value = _convert(path, hints[name], raw[name], checks)
        check = checks.get(path) or checks.get(re.sub(r"\[\d+\]", "[]", path))  # list items: "a[].b"
        if check is not None and value is not None and not check[0](value):
            message = check[1](value) if callable(check[1]) else check[1]
            _fail(path, raw[name], message)
        values[name] = value
    return cls(**values)


def _apply_override(raw: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"config error: {'.'.join(parents[: i + 1])}: is not a section")
        node = child
    node[leaf] = value


def parse_render_config(raw: Any, overrides: Mapping[str, Any] | None = None) -> RenderConfig:
    """Validate an already-parsed mapping (plus dotted-key overrides) into a RenderConfig."""
    if not isinstance(raw, Mapping):
        raise ConfigError("config error: the top level of a config must be a mapping")
    merged = _deep_copy(raw)
    for dotted, value in (overrides or {}).items():
        _apply_override(merged, dotted, value)
    return _build("", RenderConfig, merged)


def load_render_config(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RenderConfig:
    """Read a YAML render config and validate it, with dotted-key overrides applied on top."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config error: {path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config error: {path}: is a directory") from None
    except OSError as e:
        raise ConfigError(f"config error: {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config error: {path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = load_yaml(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path}: invalid YAML{yaml_problem(e)}") from None
    if raw is None:
        raw = {}
    return parse_render_config(raw, overrides)


def _deep_copy(raw: Mapping) -> dict:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
