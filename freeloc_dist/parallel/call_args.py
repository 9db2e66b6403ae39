"""A transformer call's inputs by name, wherever the caller put them: the first three may come positionally, as
diffusers' forward takes them (hidden_states, timestep, encoder_hidden_states), the rest by keyword. Used by the
engine's hooks and by CFG pairing (freeloc_dist.pipeline); pure Python, no torch."""

from __future__ import annotations

POSITIONAL = ("hidden_states", "timestep", "encoder_hidden_states")


def call_input(args, kwargs, name: str):
    """The call's input `name` (None when it was not passed)."""
    i = POSITIONAL.index(name) if name in POSITIONAL else len(args)
    return args[i] if i < len(args) else kwargs.get(name)


def with_input(args, kwargs, name: str, value):
    """(args, kwargs) of the call with its input `name` replaced by `value`, where the call passed it."""
    i = POSITIONAL.index(name) if name in POSITIONAL else len(args)
    if i < len(args):
        return (*args[:i], value, *args[i + 1:]), kwargs
    return args, {**kwargs, name: value}
