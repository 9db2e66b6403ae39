"""FreeLOC profiles (DESIGN 3, 9): which kind each self-attention layer runs, and the tier settings.

A profile is YAML under configs/profiles/; it is loaded by path or given as the parsed mapping.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from .errors import UserError
from .plan import KINDS, LongRangeParams, PlanError, TSAParams, VRPRParams, check_vrpr_params
from .yamlio import read_yaml_file


class ProfileError(UserError, ValueError):
    """A profile that does not describe a valid layer assignment."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongRange:
    """The optional `long_range:` section: which dense (vrpr/full) layers attend a sparse long range, its
    pattern, and (`probe`) how the layers were chosen, kept verbatim (rule, threshold, scores)."""

    layers: tuple[int, ...]
    params: LongRangeParams
    probe: Mapping[str, Any] | None = None

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layers": list(self.layers), **_plain(self.params)}
        if self.probe is not None:
            out["probe"] = dict(self.probe)
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Profile:
    model: str
    trained_frames: int
    kinds: tuple[str, ...]  # kind of layer i
    source: str
    vrpr: VRPRParams | None = None  # user override (checked against each F at plan time); None: derived per F
    tsa: TSAParams | None = None  # None: the defaults of DESIGN 5
    long_range: LongRange | None = None  # None: dense layers attend every key frame (the default)
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # e.g. probing scores
    # The profile names tsa.sink_frames itself; otherwise a conditioned render (image-to-video) puts the sinks
    # on its conditioning frames (freeloc_dist.families.wan.conditioning.use_condition_sinks).
    tsa_sinks_given: bool = False
    # Joint text-video attention (DESIGN 11, HunyuanVideo): the phase at which video meets text, "phi" (the
    # default when None) or "natural"; `family`: the model family the profile was made for (None: any family
    # whose layer count and T it fits)
    text_phase: str | None = None
    family: str | None = None

    @property
    def joint_text_phase(self) -> str:
        return self.text_phase or "phi"

    @property
    def num_layers(self) -> int:
        return len(self.kinds)

    def layer_spec(self, i: int) -> str:
        """What layer i runs, as the processors and plans name it: its kind, "+long" with a long range."""
        lr = self.long_range
        return self.kinds[i] + ("+long" if lr is not None and i in lr.layers else "")

    def layers(self) -> dict[str, list[int]]:
        return {k: [i for i, kind in enumerate(self.kinds) if kind == k] for k in KINDS}

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "trained_frames": self.trained_frames,
            "source": self.source,
            "layers": self.layers(),
        }
        if self.vrpr is not None:
            out["vrpr"] = _plain(self.vrpr)
        if self.tsa is not None:
            out["tsa"] = _plain(self.tsa)
            if not self.tsa_sinks_given:  # unset stays unset: a conditioned render puts the sinks on its images
                out["tsa"].pop("sink_frames")
        if self.long_range is not None:
            out["long_range"] = self.long_range.to_mapping()
        for key in ("text_phase", "family"):  # written only where given: older profiles' mappings stay as they were
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out.update(self.extra)
        return out


def _plain(params) -> dict[str, Any]:
    """A params dataclass as the YAML mapping it came from (lists, unset optional fields left out)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items() if v is not None}


_REQUIRED = ("model", "trained_frames", "layers", "source")
_OPTIONAL = ("vrpr", "tsa", "long_range", "text_phase", "family")
TEXT_PHASES = ("phi", "natural")  # freeloc_dist.attention.joint's


def parse_profile(m: Mapping[str, Any], *, where: str = "profile", allow_extra: bool = True) -> Profile:
    if not isinstance(m, Mapping):
        raise ProfileError(f"{where}: must be a mapping, got {type(m).__name__}")
    for key in _REQUIRED:
        if key not in m:
            raise ProfileError(f"{where}.{key}: missing")
    if not isinstance(m["model"], str):
        raise ProfileError(f"{where}.model={m['model']!r}: must be a string")
    if not isinstance(m["source"], str):
        raise ProfileError(f"{where}.source={m['source']!r}: must be a string")
    t = m["trained_frames"]
    if not isinstance(t, int) or isinstance(t, bool) or t < 2:
        raise ProfileError(f"{where}.trained_frames={t!r}: must be an integer >= 2")
    layers = m["layers"]
    if not isinstance(layers, Mapping):
        raise ProfileError(f"{where}.layers: must be a mapping of kind -> list of layer indices")
    unknown = set(layers) - set(KINDS)
    if unknown:
        raise ProfileError(f"{where}.layers: unknown kind(s) {sorted(unknown)}; kinds are {', '.join(KINDS)}")
    owner: dict[int, str] = {}
    for kind, idx in layers.items():
        idx = [] if idx is None else idx
        if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idx):
            raise ProfileError(f"{where}.layers.{kind}: must be a list of integers")
        for i in idx:
            if i < 0:
                raise ProfileError(f"{where}.layers.{kind}: layer index {i} is negative")
            if i in owner:
                raise ProfileError(f"{where}.layers: layer {i} listed twice ({owner[i]} and {kind})")
            owner[i] = kind
    num_layers = max(owner) + 1 if owner else 0
    missing = [i for i in range(num_layers) if i not in owner]
    if missing or not owner:
        raise ProfileError(f"{where}.layers: every layer 0..{num_layers - 1} must be listed once; missing {missing}")
    extra = {k: v for k, v in m.items() if k not in _REQUIRED + _OPTIONAL}
    if extra and not allow_extra:
        raise ProfileError(f"{where}: unknown key(s) {sorted(extra)}")
    try:
        vrpr = None if m.get("vrpr") is None else VRPRParams.from_mapping(m["vrpr"])
        tsa = None if m.get("tsa") is None else TSAParams.from_mapping(m["tsa"])
        (tsa or TSAParams()).check()
        if vrpr is not None:  # every setting that does not depend on the video's length, refused at load
            check_vrpr_params(vrpr, t)
    except PlanError as e:
        raise ProfileError(f"{where}: {e}") from None
    kinds = tuple(owner[i] for i in range(num_layers))
    text_phase, family = m.get("text_phase"), m.get("family")
    if text_phase is not None and text_phase not in TEXT_PHASES:
        raise ProfileError(f"{where}.text_phase={text_phase!r}: must be one of {', '.join(TEXT_PHASES)}")
    if family is not None and not isinstance(family, str):
        raise ProfileError(f"{where}.family={family!r}: must be a string (a model family's name)")
    long_range = None if m.get("long_range") is None else _parse_long_range(m["long_range"], kinds, where)
    return Profile(
        model=m["model"],
        trained_frames=t,
        kinds=kinds,
        source=m["source"],
        vrpr=vrpr,
        tsa=tsa,
        long_range=long_range,
        extra=extra,
        tsa_sinks_given=isinstance(m.get("tsa"), Mapping) and "sink_frames" in m["tsa"],
        text_phase=text_phase,
        family=family,
    )


def _parse_long_range(m, kinds: tuple[str, ...], where: str) -> LongRange:
    """`long_range: {layers: [...], band_frames: B, stride_frames: S, sink_frames: [...], probe: {...}}`."""
    at = f"{where}.long_range"
    if not isinstance(m, Mapping):
        raise ProfileError(f"{at}: must be a mapping with layers, band_frames, stride_frames")
    if "layers" not in m:
        raise ProfileError(f"{at}.layers: missing (the vrpr/full layers that use the long range)")
    layers = m["layers"]
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ProfileError(f"{at}.layers: must be a list of layer indices")
    for i in layers:
        if not 0 <= i < len(kinds):
            raise ProfileError(f"{at}.layers: layer {i} is not in the profile (layers 0..{len(kinds) - 1})")
        if kinds[i] == "tsa":
            raise ProfileError(f"{at}.layers: layer {i} is tsa; a long range applies to vrpr and full layers")
    if len(set(layers)) != len(layers):
        raise ProfileError(f"{at}.layers: a layer is listed twice")
    probe = m.get("probe")
    if probe is not None and not isinstance(probe, Mapping):
        raise ProfileError(f"{at}.probe: must be a mapping (how the layers were chosen)")
    try:
        params = LongRangeParams.from_mapping({k: v for k, v in m.items() if k not in ("layers", "probe")}, at)
    except PlanError as e:
        raise ProfileError(str(e)) from None
    return LongRange(layers=tuple(sorted(layers)), params=params, probe=probe)


def load_profile(profile) -> Profile:
    """A Profile from a Profile, a parsed mapping, or a path to a YAML file."""
    if isinstance(profile, Profile):
        return profile
    if isinstance(profile, Mapping):
        return parse_profile(profile)
    if isinstance(profile, (str, os.PathLike)):
        path = os.fspath(profile)
        if not os.path.isfile(path):
            raise ProfileError(f"profile {path}: file not found")
        return parse_profile(read_yaml_file(path, "profile", ProfileError), where=f"profile {path}")
    raise ProfileError(f"profile: expected a path, mapping or Profile, got {type(profile).__name__}")
