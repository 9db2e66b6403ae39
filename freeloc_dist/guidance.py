"""Classifier-free guidance, one definition for the single-process sampler and the parallel engine.

The rule is diffusers' Wan pipelines': whether the unconditional pass runs is decided once per render, by the
first (high-noise) expert's scale (`do_classifier_free_guidance`: guidance_scale > 1); the render then encodes a
negative embedding, and every step with one runs both passes and combines them with that step's own scale, even
a second expert's scale <= 1 (0 gives the unconditional prediction, 1 the conditional one up to rounding).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the planner reads uses_cfg without importing torch
    import torch


def uses_cfg(guidance_scale: float) -> bool:
    """Whether a render runs the unconditional pass: its first guidance scale is > 1 (guidance_scale_2 does not
    decide it, as in diffusers)."""
    return guidance_scale > 1.0


def runs_uncond(uncond) -> bool:
    """Whether one prediction runs the unconditional pass: the render gave it a negative embedding (it gives one
    exactly when `uses_cfg`); the step's scale does not decide it."""
    return uncond is not None


def combine(pos: torch.Tensor, neg: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided prediction neg + g (pos - neg), in float32."""
    pos, neg = pos.float(), neg.float()
    return neg + guidance * (pos - neg)
