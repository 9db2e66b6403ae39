"""Which transformer denoises which step: one expert (Wan2.1, Wan2.2 TI2V-5B) or two (Wan2.2 A14B).

Wan2.2 A14B splits the timesteps between a high-noise expert (`transformer`) and a low-noise expert
(`transformer_2`): step t runs the first while t >= boundary_ratio x num_train_timesteps, the second
below, each with its own guidance scale (the rule of diffusers' Wan pipeline, which the tests compare against).
Whether the unconditional pass runs is not the expert's: the first scale decides it for the whole render
(freeloc_dist.guidance.uses_cfg), so a second scale <= 1 still combines both passes.
Each expert carries its own `predict` because a parallel engine is installed per transformer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class Expert:
    name: str  # the pipeline component: "transformer" (high noise) or "transformer_2"
    transformer: Any
    predict: Callable  # freeloc_dist.sampling.PredictFn for this transformer
    guidance: float


@dataclass(frozen=True)
class ExpertSchedule:
    experts: tuple[Expert, ...]  # high-noise first
    boundary_timestep: float | None  # None: one expert for every step

    def __post_init__(self):
        assert len(self.experts) == (1 if self.boundary_timestep is None else 2), self

    def at(self, t) -> Expert:
        """The expert of timestep t (a scalar tensor or number on the scheduler's 0..num_train scale)."""
        return self.experts[0 if runs_first(t, self.boundary_timestep) else 1]


def runs_first(t, boundary_timestep: float | None) -> bool:
    """Whether timestep t is the first (high-noise) expert's: t >= the boundary, or every t of a one-expert model."""
    return boundary_timestep is None or float(t) >= boundary_timestep


def boundary_timestep(boundary_ratio: float | None, scheduler) -> float | None:
    """Where the experts split, on the scheduler's timestep scale (None: one expert)."""
    return None if boundary_ratio is None else boundary_ratio * scheduler.config.num_train_timesteps


def expert_steps(timesteps, boundary: float | None, expert: str) -> list[int]:
    """The step indices (of a schedule's `timesteps`) that `expert` ("transformer" or "transformer_2") denoises."""
    first = expert == "transformer"
    return [i for i, t in enumerate(timesteps) if runs_first(t, boundary) == first]


def expert_schedule(components, scheduler, guidance: float, guidance_2: float | None, predict, predict_2=None):
    """The schedule of a loaded model: `predict`/`predict_2` for the first/second transformer;
    `guidance_2` defaults to `guidance` (as in diffusers)."""
    first = Expert("transformer", components.transformer, predict, guidance)
    if components.transformer_2 is None:
        return ExpertSchedule((first,), None)
    boundary = boundary_timestep(components.boundary_ratio, scheduler)
    second = Expert("transformer_2", components.transformer_2, predict_2 if predict_2 is not None else predict,
                    guidance if guidance_2 is None else guidance_2)
    return ExpertSchedule((first, second), boundary)
