"""The render's `cache:` section: one of diffusers' caching hooks, by name, with its settings, on every transformer.

    cache: {name: first_block, threshold: 0.1}

`name` is one of choices.CACHES; the other keys are the fields of that diffusers config class (FirstBlockCacheConfig,
MagCacheConfig, ...) with the types it declares, except what the render supplies itself: callbacks (the current
timestep for pyramid attention broadcast) and MagCache's `num_inference_steps` (sampling.steps). `cache_config`
checks a section and builds the diffusers config (one-line ConfigError, before any weight loads); `enable` installs
it and counts the transformer calls it skips; `step_context` names each transformer call of a sampling step for the
caches ("cond" or "uncond", the step, sigma), as diffusers' own pipelines do with `transformer.cache_context`. Under
sequence parallelism the engine makes every data-dependent decision the whole video's (freeloc_dist.parallel.caches).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from .choices import CACHES
from .config import ConfigError, _convert, _fail, _show

# the diffusers config class of each name (choices.CACHES)
_CLASSES = {"first_block": "FirstBlockCacheConfig", "mag": "MagCacheConfig", "sea": "SeaCacheConfig",
            "taylorseer": "TaylorSeerCacheConfig", "pyramid_attention_broadcast": "PyramidAttentionBroadcastConfig",
            "text_kv": "TextKVCacheConfig"}
assert tuple(_CLASSES) == CACHES
_FROM_RENDER = {"num_inference_steps": "sampling.steps"}  # settings the render gives (MagCache)
# the caches that skip whole transformer calls (the render's "calls skipped" count); the others skip attention
# layers or text projections inside a call, which that count does not see
WHOLE_CALL_CACHES = ("first_block", "mag", "sea")
_DTYPES = ("float32", "bfloat16", "float16")
# every number a cache takes is a threshold, ratio, count, step or timestep (>= 0); these divide a step index
_AT_LEAST_ONE = {"cache_interval", "spatial_attention_block_skip_range", "temporal_attention_block_skip_range",
                 "cross_attention_block_skip_range"}
# timestep bounds: any finite number (a range from -1, or past the schedule's first timestep, covers every step)
_ANY_FINITE = {"spatial_attention_timestep_skip_range", "temporal_attention_timestep_skip_range",
               "cross_attention_timestep_skip_range"}


def cache_config(section: Mapping | None, steps: int):
    """The diffusers cache config of a render's `cache:` section (None: no cache)."""
    if section is None:
        return None
    import diffusers

    name = section["name"]  # config.py checked it is one of CACHES
    cls = getattr(diffusers, _CLASSES[name])
    hints = typing.get_type_hints(cls)
    settable = {f.name for f in dataclasses.fields(cls)
                if f.name not in _FROM_RENDER and not _is_callable(hints[f.name])}
    values = {}
    for key, value in section.items():
        if key == "name":
            continue
        where = f"cache.{key}"
        if key in _FROM_RENDER:
            raise ConfigError(f"config error: {where}: set by the render ({_FROM_RENDER[key]})")
        if key not in settable:
            raise ConfigError(f"config error: {where}: unknown setting of the {name} cache (expected one of: "
                              f"{', '.join(sorted(settable)) or 'none'})")
        values[key] = _setting(where, hints[key], value)
    if "num_inference_steps" in hints:
        values["num_inference_steps"] = steps
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        text = " ".join(str(e).split())
        raise ConfigError(f"config error: cache={_show(dict(section))}: {text}") from None


class _Step:
    """The sampling step under way (set by step_context): what each transformer call tells the caches."""

    cond = None  # the step's conditional text states (None: no step under way)
    index = steps = sigma = timestep = None


class RenderCache:
    """The render's cache on every transformer (each expert has its own state, as in diffusers' pipelines), and
    how many transformer calls ran their last attention layer: a whole-pass cache (first_block, mag, sea) skips
    it, so `summary()` counts the calls it skipped. The hooks are registered once (a compiled transformer sees the
    same hooks at every step)."""

    def __init__(self, transformers, name: str, config):
        from .families import family_of

        if hasattr(config, "current_timestep_callback"):  # pyramid attention broadcast
            config = dataclasses.replace(config, current_timestep_callback=lambda: _Step.timestep)
        self.name, self.transformers = name, transformers
        self.calls, self.full = 0, 0
        self.last = None  # the last render's summary()
        for transformer in transformers:
            transformer.enable_cache(config)
            transformer.register_forward_pre_hook(self._name_call, with_kwargs=True, prepend=True)
            family_of(transformer).attention_layers(transformer)[-1].register_forward_pre_hook(self._count_full)

    def _name_call(self, module, args, kwargs):
        """The call's cache context: "cond" when its text is the step's conditional text, else "uncond"."""
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        self.calls += 1
        if _Step.cond is not None:
            text = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            _set_cache_context(module, CacheContext("cond" if text is _Step.cond else "uncond", step_index=_Step.index,
                                                    num_inference_steps=_Step.steps, sigma=_Step.sigma))

    def _count_full(self, module, args):
        self.full += 1

    def start(self) -> None:
        """A render starts every cache afresh (diffusers' pipelines reset them after each call)."""
        self.calls, self.full = 0, 0
        self.last = None  # the last render's summary()
        for transformer in self.transformers:
            transformer._reset_stateful_cache()

    def summary(self, comm) -> dict:
        """The render's calls and skipped calls, kept as `last`. Under cfg_degree 2 each CFG group runs half the
        calls, so the counts are summed over the cfg group (a collective: every rank calls this once a render)."""
        import torch

        counts = [self.calls, self.calls - self.full]
        if comm.dims.cfg_degree > 1:
            counts = [int(sum(x)) for x in zip(*comm.cfg_all_gather(torch.tensor(counts, device=comm.dims.device),
                                                                   tag="cache"))]
        self.last = {"name": self.name, "transformer_calls": counts[0], "skipped": counts[1]}
        return self.last


def summary_line(summary: dict) -> str:
    """The render's log line of RenderCache.summary(): whole calls skipped, and what that count does not see."""
    line = f"cache {summary['name']}: {summary['skipped']} of {summary['transformer_calls']} transformer calls skipped"
    if summary["name"] not in WHOLE_CALL_CACHES:
        line += " (this cache saves work inside calls, which this count does not see)"
    return line


def enable(transformers, section: Mapping | None, steps: int) -> RenderCache | None:
    """Install the render's `cache:` section (None: no cache)."""
    config = cache_config(section, steps)
    return None if config is None else RenderCache(transformers, section["name"], config)


@contextlib.contextmanager
def step_context(transformer, scheduler, step: int, cond):
    """The transformer calls inside are sampling step `step` of `scheduler`, `cond` its conditional text."""
    if getattr(transformer, "_cache_config", None) is None:  # no cache on this transformer
        yield
        return
    from diffusers.hooks.hooks import _set_cache_context

    from .families import family_of

    # the conditional call's text argument (HunyuanVideo's text is a dataclass of several tensors)
    _Step.cond = family_of(transformer).text_kwargs(cond)["encoder_hidden_states"]
    _Step.index, _Step.steps = step, len(scheduler.timesteps)
    _Step.sigma, _Step.timestep = float(scheduler.sigmas[step]), scheduler.timesteps[step]
    try:
        yield
    finally:
        _Step.cond = _Step.index = _Step.steps = _Step.sigma = _Step.timestep = None
        _set_cache_context(transformer, None)


def _is_callable(hint) -> bool:
    return "Callable" in str(hint)  # typing.Callable[...] or collections.abc.Callable[...], maybe | None


def _setting(where: str, hint, value: Any):
    """`value` (from YAML or a flag) as the diffusers field's type `hint`; ConfigError naming `where`."""
    import torch

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        *others, last = [o for o in options if o not in (type(None), torch.Tensor)]  # a tensor: as a list
        for option in others:
            with contextlib.suppress(ConfigError):
                return _setting(where, option, value)
        return _setting(where, last, value)
    if hint is torch.dtype:
        if value not in _DTYPES:
            _fail(where, value, f"must be one of: {', '.join(_DTYPES)}")
        return getattr(torch, value)
    if origin in (list, tuple):
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            _fail(where, value, "expected a list")
        if origin is tuple and args and args[-1] is not Ellipsis and len(value) != len(args):
            _fail(where, value, f"expected a list of {len(args)}")
        inner = [args[0]] * len(value) if origin is list or args[-1] is Ellipsis else list(args)
        items = [_setting(f"{where}[{i}]", h, v) for i, (h, v) in enumerate(zip(inner, value))]
        return tuple(items) if origin is tuple else items
    if hint in (bool, int, float, str):
        value = _convert(where, hint, value)  # the config's own scalar rules
        if hint in (int, float):  # diffusers checks few of these; a bad one ran silently or failed after loading
            name = where.rsplit(".", 1)[-1].split("[")[0]
            least = 1 if name in _AT_LEAST_ONE else -math.inf if name in _ANY_FINITE else 0
            if not (math.isfinite(value) and value >= least):
                _fail(where, value, "must be a finite number" + (f" >= {least}" if math.isfinite(least) else ""))
        return value
    _fail(where, value, "cannot be set from a config")
