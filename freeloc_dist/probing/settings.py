"""Probing settings (configs/probing.yaml, flags on top), validated by the package's one config validator
(freeloc_dist.config.build_config) with the value checks below."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml

from ..config import MAX_STEPS, REPO_ROOT, ConfigError, build_config
from ..families.kind import FRAMES_RULE
from ..yamlio import load_yaml, yaml_problem

DEFAULT_PROMPTS = (
    "a red fox running through fresh snow in a pine forest, golden morning light, tracking shot",
    "a busy city street at night in the rain, neon reflections on the pavement, people with umbrellas",
    "ocean waves rolling onto a rocky beach at sunset, slow aerial shot along the coastline",
)
DEFAULT_SETTINGS_PATH = REPO_ROOT / "configs" / "probing.yaml"
CONTEXT_SCORES = ("context_entropy", "context_output")
POSITION_SCORES = ("position_attention", "position_output")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuleSettings:
    context_score: Literal[CONTEXT_SCORES] = "context_entropy"  # which score decides tsa
    position_score: Literal[POSITION_SCORES] = "position_attention"  # decides full vs vrpr
    tsa_relative: float = 1.0  # tsa if context score >= tsa_relative * mean over layers ...
    tsa_min: float = 0.02  # ... and >= tsa_min
    full_max: float = 0.01  # full if not tsa and position score <= full_max; negative: never full


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeSettings:
    prompts: tuple[str, ...] = DEFAULT_PROMPTS  # empty: the render config's prompt
    trained_frames: int | None = None  # T (latent); None: from the render config's profile
    frames: int | None = None  # target length in output video frames (4k+1); None: the render config's
    steps: int | None = None  # sampling steps of the trajectories; None: the render config's
    timesteps: tuple[float, ...] = (0.2, 0.5, 0.8)  # where on the trajectory to probe, fractions in [0, 1)
    shifts: tuple[int, ...] = (-2, -1, 1, 2)  # key shifts of the position probe, in units of R
    query_samples: int = 256  # query rows per layer for attention statistics (all rows if fewer)
    measure_output: bool = True  # also spend one forward per (layer, perturbation) on output changes
    seed: int | None = None  # noise and query sample; None: the render config's sampling.seed
    rule: RuleSettings = dataclasses.field(default_factory=RuleSettings)


def _finite(v) -> bool:
    return math.isfinite(v)


# Value checks by dotted path (types come from the dataclass hints).
_CHECKS = {
    "probing.prompts": (lambda v: all(v), "expected a list of non-empty strings"),
    "probing.trained_frames": (lambda v: v >= 2, "must be >= 2"),
    "probing.frames": (FRAMES_RULE.valid, "must be 4k+1 (output video frames)"),
    # The render's own bound (config.MAX_STEPS): the trajectories are the render's sampler, so every step count a
    # render takes can be probed, and an absurd one (1e9 allocates the timestep table) is refused before loading.
    "probing.steps": (lambda v: 1 <= v <= MAX_STEPS, f"must be >= 1 and <= {MAX_STEPS}"),
    "probing.timesteps": (lambda v: len(v) > 0 and all(math.isfinite(x) and 0 <= x < 1 for x in v),
                          "expected a non-empty list of fractions in [0, 1)"),
    "probing.shifts": (lambda v: len(v) > 0 and all(x != 0 for x in v),
                       "expected a non-empty list of non-zero integers (multiples of R)"),
    "probing.query_samples": (lambda v: v >= 1, "must be >= 1"),
    "probing.seed": (lambda v: v >= 0, "must be >= 0"),
    "probing.rule.tsa_relative": (_finite, "expected a finite number"),
    "probing.rule.tsa_min": (_finite, "expected a finite number"),
    "probing.rule.full_max": (_finite, "expected a finite number"),
}


def parse_probe_settings(raw: Mapping[str, Any] | None) -> ProbeSettings:
    """Validate a mapping (the probing YAML, with overrides applied) into ProbeSettings."""
    settings = build_config(ProbeSettings, dict(raw or {}), where="probing", checks=_CHECKS)
    if not settings.measure_output:
        for key, score in (("context_score", settings.rule.context_score),
                           ("position_score", settings.rule.position_score)):
            if score.endswith("_output"):
                raise ConfigError(f"config error: probing.rule.{key}={score!r}: needs probing.measure_output: true")
    return settings


def load_probe_settings(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> ProbeSettings:
    """Read the probing YAML (default configs/probing.yaml; a missing default file means all defaults)."""
    raw: dict[str, Any] = {}
    if path is not None or DEFAULT_SETTINGS_PATH.is_file():
        p = Path(path) if path is not None else DEFAULT_SETTINGS_PATH
        try:
            raw = load_yaml(p.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config error: {p}: file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config error: {p}: not UTF-8 text") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {p}: invalid YAML{yaml_problem(e)}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config error: {p}: the top level must be a mapping")
    raw = dict(raw)
    for key, value in (overrides or {}).items():
        if key.startswith("rule."):
            raw["rule"] = {**(raw.get("rule") or {}), key[5:]: value}
        else:
            raw[key] = value
    return parse_probe_settings(raw)


def trajectory_steps(fractions: Sequence[float], steps: int, within: tuple[int, int] | None = None) -> list[int]:
    """Step indices of the trajectory to probe at (fractions of `steps`, deduplicated, in order).
    `within` = (first, end): fractions of that step range instead (one expert's steps of a two-expert model)."""
    first, end = within if within is not None else (0, steps)
    out: list[int] = []
    for frac in fractions:
        i = min(end - 1, first + int(frac * (end - first)))
        if i not in out:
            out.append(i)
    return out
