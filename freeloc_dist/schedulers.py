"""The sampler of a render (`sampling.scheduler`): the model's own scheduler, or one of diffusers' flow-matching
samplers built from the model's scheduler config with the render's flow shift (`sampling.shift`).

    model   the scheduler class and settings the model directory ships (Wan: UniPC with flow sigmas)
    euler   FlowMatchEulerDiscreteScheduler (first order; one model call per step)
    unipc   UniPCMultistepScheduler with flow sigmas (Wan's default: a multistep predictor-corrector)
    dpm++   DPMSolverMultistepScheduler, algorithm dpmsolver++, with flow sigmas

A choice is built as a diffusers user builds it: `Class.from_config(model scheduler config, <flow settings>)`,
so the model's solver settings (order, final sigma, ...) carry over where the class has them; keys the class
does not take are left out rather than passed (diffusers warns about each). Every render gets a fresh scheduler:
no step state is carried between renders.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from .choices import SCHEDULER_CHOICES

# name -> (diffusers class, settings that make it a flow-matching sampler; the shift is added by `build`)
_FLOW = {"prediction_type": "flow_prediction", "use_flow_sigmas": True}
_CHOICES = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {"use_dynamic_shifting": False}),
    "unipc": ("UniPCMultistepScheduler", _FLOW),
    "dpm++": ("DPMSolverMultistepScheduler", {**_FLOW, "algorithm_type": "dpmsolver++"}),
}
assert set(_CHOICES) | {"model"} == set(SCHEDULER_CHOICES)


def scheduler_for_render(scheduler, shift: float):
    """A fresh copy of the model's own scheduler (no step state carried between renders) with the flow shift set."""
    config = dict(scheduler.config)
    overrides: dict[str, Any] = {}
    if "flow_shift" in config and config.get("use_flow_sigmas", False):
        overrides["flow_shift"] = shift  # UniPC/DPM-style schedulers with flow sigmas (Wan's own)
    elif "shift" in config:
        # FlowMatchEuler-style: a static shift, as Wan uses; dynamic (resolution-dependent) shifting off
        overrides["shift"] = shift
        if config.get("use_dynamic_shifting"):
            overrides["use_dynamic_shifting"] = False
    else:
        warnings.warn(f"sampling.shift has no effect on {type(scheduler).__name__}", stacklevel=2)
    return type(scheduler).from_config(config, **overrides)


def scheduler_class(choice: str, template) -> type:
    """The diffusers scheduler class a choice runs (`template`: the model's own scheduler)."""
    if choice == "model":
        return type(template)
    import diffusers

    return getattr(diffusers, _CHOICES[choice][0])


def build_scheduler(template, choice: str, shift: float):
    """A fresh scheduler for one render: `choice` (one of SCHEDULER_CHOICES) built from the model's scheduler
    `template` with flow shift `shift`."""
    if choice == "model":
        return scheduler_for_render(template, shift)
    cls = scheduler_class(choice, template)
    settings = dict(_CHOICES[choice][1])
    settings["shift" if choice == "euler" else "flow_shift"] = shift
    accepted = inspect.signature(cls.__init__).parameters
    config = {k: v for k, v in dict(template.config).items() if k in accepted}
    return cls.from_config({**config, **settings})
