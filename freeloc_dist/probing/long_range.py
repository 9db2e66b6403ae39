"""Probing the sparse long range (issue 18): which dense layers can drop their far keys.

For each dense layer i (kind vrpr or full in the base profile) the probe measures, at the target length, how
much the model's flow prediction changes when that one layer attends the long-range pattern (the band, the
strided key frames and the sinks; freeloc_dist.plan.LongRangeParams) while every other layer runs as the base
profile says:

    change_i = mean over inputs of ||y_i - y|| / ||y||     (Frobenius, float64)

where y is the prediction under the base profile and y_i the one with layer i long-range. The rule: layer i gets
the long range iff change_i <= threshold (default 0.02: the prediction moves by at most 2 %; at the toy's 12x,
that is about a tenth of the gap between stock attention and FreeLOC there). The rule, the threshold, the
pattern, the target length and every change are written into the profile's `long_range.probe` section and its
`source`. A change is measured one layer at a time, so the sum of several chosen layers' changes is not
guaranteed; the quality benches measure the combination.

Inputs are any ProbeInput list (latents at the target length, a timestep, conditional text): trajectory points
(freeloc_dist.probing.trajectory_inputs) for a real model, noised worlds for the testbed's toy.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..install import restore, snapshot
from ..plan import LongRangeParams
from ..profile import Profile, load_profile
from .prober import ProbeInput

DEFAULT_THRESHOLD = 0.02
RULE_TEXT = ("long range on dense layer i iff change_i <= threshold, change_i = mean over probe inputs of "
             "||y_i - y|| / ||y||, y the flow prediction with the base profile, y_i with only layer i long-range")


def _with_long_range(profile: Profile, layers: Sequence[int], params: LongRangeParams) -> dict[str, Any]:
    m = profile.to_mapping()
    m.pop("long_range", None)
    if layers:
        m["long_range"] = {"layers": sorted(layers), "band_frames": params.band_frames,
                           "stride_frames": params.stride_frames, "sink_frames": list(params.sink_frames)}
    return m


@torch.no_grad()
def _predict(transformer, inp: ProbeInput) -> torch.Tensor:
    out = transformer(hidden_states=inp.latents.to(transformer.dtype), timestep=inp.timestep.reshape(1),
                      encoder_hidden_states=inp.text.to(transformer.dtype), return_dict=False)[0]
    return out.double()


def measure_long_range(transformer, profile, inputs: Sequence[ProbeInput], params, *, layers=None,
                       backend: str = "sdpa", log=None) -> dict[int, float]:
    """change_i (module docstring) for every dense layer of `profile` (or `layers`); the model is restored."""
    from ..install import apply_freeloc

    prof = load_profile(profile)
    params = LongRangeParams.from_mapping(params)
    dense = [i for i, k in enumerate(prof.kinds) if k != "tsa"] if layers is None else list(layers)
    before = snapshot(transformer)
    try:
        apply_freeloc(transformer, _with_long_range(prof, [], params), backend)
        base = [_predict(transformer, x) for x in inputs]
        changes = {}
        for i in dense:
            apply_freeloc(transformer, _with_long_range(prof, [i], params), backend)
            rel = [float((_predict(transformer, x) - y).norm() / y.norm().clamp_min(1e-30))
                   for x, y in zip(inputs, base)]
            changes[i] = sum(rel) / len(rel)
            if log is not None:
                log(f"layer {i}: change {changes[i]:.4f}")
    finally:
        restore(transformer, before)
    return changes


def choose_long_range(changes: Mapping[int, float], threshold: float = DEFAULT_THRESHOLD) -> list[int]:
    """The rule: the layers whose change is at most `threshold`, in layer order."""
    if not threshold >= 0:
        raise ValueError(f"long-range threshold {threshold!r}: must be >= 0")
    return sorted(i for i, c in changes.items() if c <= threshold)


def long_range_profile(profile, params, changes: Mapping[int, float], threshold: float = DEFAULT_THRESHOLD, *,
                       target_frames: int, inputs: str) -> dict[str, Any]:
    """The base profile with a probed `long_range` section (layers by the rule, the rule and the scores)."""
    prof = load_profile(profile)
    params = LongRangeParams.from_mapping(params)
    chosen = choose_long_range(changes, threshold)
    m = _with_long_range(prof, chosen, params)
    if not chosen:  # nothing passed: the profile stays plain, the probe result goes into the source
        m.pop("long_range", None)
    else:
        m["long_range"]["probe"] = {
            "rule": RULE_TEXT, "threshold": threshold, "target_frames": target_frames, "inputs": inputs,
            "change": {int(i): float(f"{c:.6g}") for i, c in sorted(changes.items())},
        }
    measured = ", ".join(f"{i}: {c:.4g}" for i, c in sorted(changes.items()))
    m["source"] = (f"{prof.source.strip()}; long range (band {params.band_frames}, stride {params.stride_frames}) "
                   f"probed at {target_frames} latent frames on {inputs}: change per dense layer {{{measured}}}; "
                   f"layers {chosen} have change <= {threshold:g} (freeloc_dist.probing.long_range)")
    return m


__all__ = ["DEFAULT_THRESHOLD", "RULE_TEXT", "measure_long_range", "choose_long_range", "long_range_profile"]
