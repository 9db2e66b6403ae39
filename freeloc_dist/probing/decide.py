"""From scores to a profile: the decision rule, the profile's score table, and the YAML writer."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml

from ..profile import parse_profile
from .settings import RuleSettings


def assign_kinds(scores: Mapping[str, Sequence[float]], rule: RuleSettings) -> tuple[list[str], dict[str, float]]:
    """Kinds per layer by the documented rule, and the thresholds as applied."""
    ctx = torch.as_tensor(scores[rule.context_score], dtype=torch.float64)
    pos = torch.as_tensor(scores[rule.position_score], dtype=torch.float64)
    if bool(torch.isnan(ctx).any() | torch.isnan(pos).any()):
        raise ValueError("probing: a layer has no score; every layer must be measured before deciding")
    tsa_cut = max(rule.tsa_min, rule.tsa_relative * float(ctx.mean()))
    kinds = []
    for c, p in zip(ctx.tolist(), pos.tolist()):
        kinds.append("tsa" if c >= tsa_cut else "full" if p <= rule.full_max else "vrpr")
    return kinds, {"tsa_cut": tsa_cut, "context_mean": float(ctx.mean())}


def choose_text_phase(scores: Mapping[str, Sequence[float]], kinds: Sequence[str]) -> tuple[str, dict[str, float]]:
    """The text-phase probe's decision (DESIGN 11), for joint text-video families: the setting under which the
    video queries' attention over the text at the target length stays closest to the trained length's. Per layer
    the drift of a setting is |H_setting - H_trained| / H_trained (text-only attention entropy, mean over heads;
    stats.text_phase_stats); averaged over the layers that are not `full` (a full layer is stock: natural phases
    whatever the setting). `natural` if its drift is smaller, else `phi` (the default; also on a tie and when every
    layer is full). Returns (text_phase, {text_drift_phi, text_drift_natural})."""
    layers = [i for i, kind in enumerate(kinds) if kind != "full"]
    if not layers:
        return "phi", {}
    ref = torch.as_tensor(scores["text_entropy_trained"], dtype=torch.float64)[layers]
    drift = {}
    for phase in ("phi", "natural"):
        h = torch.as_tensor(scores[f"text_entropy_{phase}"], dtype=torch.float64)[layers]
        drift[f"text_drift_{phase}"] = float(((h - ref).abs() / ref.clamp_min(1e-12)).mean())
    return ("natural" if drift["text_drift_natural"] < drift["text_drift_phi"] else "phi"), drift


TEXT_PHASE_RULE = ("natural if the mean over non-full layers of |text_entropy_natural - text_entropy_trained| / "
                   "text_entropy_trained is smaller than that of text_entropy_phi; else phi")


RULE_TEXT = (
    "tsa if context_score >= max(tsa_min, tsa_relative * mean of context_score over layers); "
    "else full if position_score <= full_max; else vrpr"
)


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def score_table(scores: Mapping[str, torch.Tensor], shifts: Sequence[int], trained_frames: int) -> dict[str, Any]:
    """The profile's `scores` section: lists indexed by layer, by-shift scores keyed by the shift."""
    r = trained_frames - 1
    out: dict[str, Any] = {}
    for name in ("position_attention", "position_output", "context_entropy", "context_output",
                 "entropy_trained", "entropy_target", "text_entropy_trained", "text_entropy_phi",
                 "text_entropy_natural"):
        if name in scores:
            out[name] = [_round(x) for x in scores[name].tolist()]
    for kind in ("position_attention", "position_output"):
        by = {f"{s:+d}R": [_round(x) for x in scores[f"{kind}@{s * r:+d}"].tolist()]
              for s in shifts if f"{kind}@{s * r:+d}" in scores}
        if by:
            out[f"{kind}_by_shift"] = by
    return out


def probed_profile(*, model: str, trained_frames: int, kinds: Sequence[str], scores: Mapping[str, Any],
                   rule: RuleSettings, applied: Mapping[str, float], settings: Mapping[str, Any],
                   base: Mapping[str, Any] | None = None, date: str | None = None, family: str | None = None,
                   text_phase: str | None = None) -> dict[str, Any]:
    """The profile mapping (DESIGN 9) plus date, settings, rule and scores; `base` lends tsa/vrpr sections.
    `family` and `text_phase` (joint text-video families, decided by choose_text_phase) are written when given."""
    date = date or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    layers = {k: [i for i, kind in enumerate(kinds) if kind == k] for k in ("tsa", "vrpr", "full")}
    counts = ", ".join(f"{len(v)} {k}" for k, v in layers.items())
    out: dict[str, Any] = {
        "model": model,
        "trained_frames": trained_frames,
        "source": f"layer probing (launch/probe.py) on {date[:10]}: {counts}; rule, settings and scores below",
        "layers": layers,
    }
    for section in ("vrpr", "tsa"):
        if base is not None and base.get(section) is not None:
            out[section] = dict(base[section])
    for key, value in (("family", family), ("text_phase", text_phase)):
        if value is not None:
            out[key] = value
    out["date"] = date
    out["rule"] = {"text": RULE_TEXT, **dataclasses.asdict(rule), **{k: _round(v) for k, v in applied.items()}}
    if text_phase is not None:
        out["rule"]["text_phase_rule"] = TEXT_PHASE_RULE
    out["settings"] = dict(settings)
    out["scores"] = dict(scores)
    return out


def write_profile(path: str | Path, profile: Mapping[str, Any]) -> Path:
    """Write a probed profile as YAML (checked to load back through parse_profile first), atomically: a
    temporary file in the same folder renamed over `path` once complete, so a failed write (a full disk, a
    kill) leaves no partial profile and any previous one as it was."""
    from ..video import atomic_path

    parse_profile(profile, where=f"probed profile {path}")
    path = Path(path)
    header = ("# FreeLOC profile written by launch/probe.py (layer-adaptive probing).\n"
              "# layers: the assignment; rule, settings and scores: how it was obtained (lists are per layer).\n")
    text = header + yaml.dump(profile, Dumper=_ProfileDumper, sort_keys=False, width=120)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


class _ProfileDumper(yaml.SafeDumper):
    """Block style, except lists of numbers (layer indices, per-layer scores) on one line each."""


def _represent_list(dumper, data):
    flow = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_ProfileDumper.add_representer(list, _represent_list)
