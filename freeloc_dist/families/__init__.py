"""Model families behind one adapter (DESIGN 11).

A family is one folder of this package (families/wan/, ...) holding every fact of its models: which attention
modules FreeLOC replaces and how they compute q, k, v and the output, the RoPE tables and their temporal part,
and (as the move continues) inputs, VAE and planner counts. The engine, the processors, probing and the
render loop see only the `Family` object `family_of(transformer)` returns; nothing outside families/ names a
family's classes. A family registers itself with `register` when its folder is imported; the registry imports
the known folders on first use, so shared code never imports a family folder itself.

A family outside the package (a user's, or the test suite's skeleton family) is named in the environment:
FREELOC_FAMILIES="pkg.module,other.module" imports those modules after the built-in folders, in every process
that looks a family up (each rank of a torchrun world included), and each registers itself as the built-ins do.
"""

from __future__ import annotations

import importlib
import os

from ..errors import UserError
from .base import Family

__all__ = ["Family", "register", "family_of", "family_of_vae", "registered", "PLUGINS_ENV"]

# The folders imported on first use (each calls `register`); FREELOC_FAMILIES and a test may register more.
_BUILTIN = ("freeloc_dist.families.wan", "freeloc_dist.families.hunyuan_video",
            "freeloc_dist.families.hunyuan_video15")
PLUGINS_ENV = "FREELOC_FAMILIES"
_REGISTRY: list[Family] = []
_loaded = False


def register(family: Family) -> Family:
    """Add a family (replacing one of the same name); returns it. Lookups ask the newest family first, so a
    family whose classes subclass another family's is found before that one."""
    _REGISTRY[:] = [family] + [f for f in _REGISTRY if f.name != family.name]
    return family


def registered() -> list[Family]:
    """Every family, newest first (the built-in folders are imported on the first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN:
            importlib.import_module(module)
        for module in _plugin_modules():
            try:
                importlib.import_module(module)
            except ImportError as e:
                _loaded = False  # the next lookup says it again rather than serving fewer families
                raise UserError(f"{PLUGINS_ENV}: cannot import family module {module!r}: {e}") from None
    return list(_REGISTRY)


def _plugin_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]


def family_of(transformer) -> Family:
    """The family of a built diffusers transformer; a clear error for a model no family serves."""
    families = registered()
    for family in families:
        if family.owns(transformer):
            return family
    names = ", ".join(cls for f in families for cls in f.transformer_classes)
    raise TypeError(f"{type(transformer).__name__}: not a supported transformer (supported: {names})")


def family_of_vae(vae) -> Family:
    """The family of a built diffusers VAE (decode.py streams through it)."""
    families = registered()
    for family in families:
        if family.owns_vae(vae):
            return family
    raise TypeError(f"{type(vae).__name__}: not the VAE of a supported model family "
                    f"({', '.join(f.name for f in families)})")
