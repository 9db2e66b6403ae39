"""Which model a directory holds: the family whose pipeline class model_index.json names reads its configs
(freeloc_dist.families), never its name or path. No torch import: preflight runs this before any heavy work.
"""

from __future__ import annotations

from pathlib import Path

from .families import Family, registered
from .families.kind import EXPERT_NAMES, ModelKind, ModelKindError, check_profile_fits, read_json

__all__ = ["EXPERT_NAMES", "ModelKind", "ModelKindError", "check_profile_fits", "model_family", "read_model_kind"]


def model_family(model_dir: str | Path) -> Family:
    """The family serving the diffusers-format model in `model_dir` (from model_index.json's _class_name)."""
    index = read_json(Path(model_dir) / "model_index.json")
    pipeline = str(index.get("_class_name", ""))
    families = registered()
    for family in families:
        if pipeline in family.pipelines:
            return family
    known = " or ".join(p for f in reversed(families) for p in f.pipelines)  # in registration order
    raise ModelKindError(f"model_index.json: _class_name={pipeline!r}: expected {known}")


def read_model_kind(model_dir: str | Path) -> ModelKind:
    """The kind of the diffusers-format model in `model_dir` (configs only; no weights read)."""
    return model_family(model_dir).read_model_kind(model_dir)
