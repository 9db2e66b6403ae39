"""Classifier-free guidance, one definition for the single-process sampler and the parallel engine."""

from __future__ import annotations

import torch


def uses_cfg(uncond, guidance: float) -> bool:
    """Whether the unconditional pass runs: a negative embedding exists and guidance > 1."""
    return uncond is not None and guidance > 1.0


def combine(pos: torch.Tensor, neg: torch.Tensor, guidance: float) -> torch.Tensor:
    """The guided prediction neg + g (pos - neg), in float32."""
    pos, neg = pos.float(), neg.float()
    return neg + guidance * (pos - neg)
