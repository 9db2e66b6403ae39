"""FreeLOC and the sequence-parallel engine on a stock diffusers pipeline of a supported family (DESIGN 9).

    enable_freeloc(pipe, profile)          # every transformer of the pipeline
    parallelize_pipeline(pipe)             # under torchrun, on every rank
    video = pipe(prompt=..., num_frames=..., generator=torch.Generator().manual_seed(0)).frames

The pipeline's own loop, scheduler and VAE run unchanged on every rank; only the transformer calls are
distributed (each rank runs its frames, the prediction is gathered: the engine's hooks, parallel/engine.py),
so every rank returns what one process returns. With cfg_degree 2 the pipeline's serial cond / uncond
calls are paired: at the cond call the two CFG groups compute cond and uncond at once (the negative
embeddings are taken from the pipeline's own encode_prompt, read as its family says), and the uncond call
that follows with the same latents, timestep and negative embeddings gets the cached result. Any other call
is computed as asked, so the result is exact whatever the pipeline does. The embeddings are every text input
of the transformer (HunyuanVideo: the text, its mask and the pooled text; 1.5: both texts and their masks), read
from the pipeline's encode_prompt calls (one per prompt there: _PromptCapture).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .install import FreeLOCHandle, apply_freeloc, check_not_diffusers_parallel
from .parallel.call_args import call_input, with_input
from .profile import load_profile

COMPONENTS = ("transformer", "transformer_2")


def pipeline_transformers(pipe) -> dict:
    """{component name: transformer} of a diffusers pipeline (transformer_2 when present and set)."""
    found = {name: getattr(pipe, name, None) for name in COMPONENTS}
    found = {name: model for name, model in found.items() if model is not None}
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no transformer (looked for {', '.join(COMPONENTS)})")
    return found


class PipelineHandle:
    """Returned by enable_freeloc / parallelize_pipeline; `remove()` undoes what that call installed."""

    def __init__(self, parts, undo=None):
        self.parts = parts  # {component: FreeLOCHandle or SequenceParallel}
        self._undo = undo

    def remove(self) -> None:
        for part in self.parts.values():
            part.remove()
        if self._undo is not None:
            self._undo()
            self._undo = None


def enable_freeloc(pipe, profile, backend: str = "sdpa") -> PipelineHandle:
    """apply_freeloc on every transformer of `pipe`. `profile`: one profile (path, mapping, Profile) for
    all, or {component name: profile}; a pipeline with two experts needs a profile for each."""
    models = pipeline_transformers(pipe)
    if isinstance(profile, Mapping) and profile and set(profile) <= set(COMPONENTS):
        missing = [name for name in models if name not in profile]
        if missing:
            raise ValueError(f"enable_freeloc: no profile for {missing[0]!r} (this pipeline has "
                             f"{', '.join(models)}; give a profile for each, or one profile for all)")
        unused = [name for name in profile if name not in models]
        if unused:
            raise ValueError(f"enable_freeloc: profile given for {unused[0]!r}, which this pipeline does not have")
        profiles = {name: load_profile(profile[name]) for name in models}
    else:
        profiles = dict.fromkeys(models, load_profile(profile))
    for model in models.values():  # refuse before installing anything
        check_not_diffusers_parallel(model)
    handles: dict[str, FreeLOCHandle] = {}
    for name, model in models.items():
        handles[name] = apply_freeloc(model, profiles[name], backend=backend)
    return PipelineHandle(handles)


def parallelize_pipeline(pipe, cfg_degree: int = 1, strategy: str = "auto", *, backend: str | None = None,
                         timeout_s: float = 600.0) -> PipelineHandle:
    """Make the stock `pipe(...)` run sequence-parallel (and CFG-parallel with cfg_degree 2) over the
    torchrun world; call it on every rank, after enable_freeloc if FreeLOC is wanted. Initialises the
    process group if needed. Every rank must call the pipeline with the same arguments and a generator
    seeded alike (checked at every transformer call). `backend`: the attention kernel of the engine
    (default: FreeLOC's, else sdpa)."""
    from .parallel import init_parallel, parallelize

    models = pipeline_transformers(pipe)
    for model in models.values():
        check_not_diffusers_parallel(model)
        state = getattr(model, "freeloc_state", None)
        if state is not None and getattr(state, "engine", None) is not None:
            raise RuntimeError("parallelize_pipeline: this pipeline is already parallelised")
    dims = init_parallel(cfg_degree=cfg_degree, timeout_s=timeout_s)
    if dims.device.type == "cuda":
        pipe.to(dims.device)  # each rank on its own GPU (LOCAL_RANK)
    engines = {}
    for name, model in models.items():
        state = getattr(model, "freeloc_state", None)
        chosen = backend or getattr(state, "backend", None) or "sdpa"
        engines[name] = parallelize(model, dims, backend=chosen, strategy=strategy)
    undo = None
    if dims.cfg_degree == 2:
        from .families import family_of

        capture = _PromptCapture(pipe, family_of(next(iter(engines.values())).transformer))
        for engine in engines.values():
            engine.pairing = CFGPairing(pipe, capture, engine)
        undo = capture.remove
    return PipelineHandle(engines, undo)


class _PromptCapture:
    """Wraps pipe.encode_prompt (an instance attribute, removed again) to keep the prompts a pipeline call encoded,
    as the transformer inputs that carry them (the family reads encode_prompt's output): `texts` is [positive] or
    [positive, negative]. Wan's encode_prompt returns both at once; HunyuanVideo's pipelines encode the negative
    prompt in a second call, before any transformer call: a one-prompt encode that follows a one-prompt encode
    with no transformer call between them is the negative of the first."""

    def __init__(self, pipe, family):
        self.pipe = pipe
        self.family = family  # reads the pipeline's encode_prompt output and its guidance flag
        self.inner = pipe.encode_prompt
        self.texts: list[dict] = []
        self.open = False  # the last encode gave one prompt and no transformer call has run since
        pipe.encode_prompt = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        new = self.family.pipeline_prompt_texts(out)
        if self.open and len(new) == 1:
            self.texts, self.open = self.texts + new, False
        else:
            self.texts, self.open = new, len(new) == 1
        return out

    def transformer_called(self):
        self.open = False

    def remove(self):
        if self.pipe.__dict__.get("encode_prompt") is self:
            del self.pipe.__dict__["encode_prompt"]


def _stateful_hooks(transformer) -> bool:
    """Whether a stateful diffusers hook (a cache: pyramid attention broadcast, first block cache, ...) sits on the
    transformer or one of its modules. Such a hook counts the calls it sees; a paired uncond call, answered without
    running the forward, would change what it counts, so CFG pairing computes every call as asked instead."""
    from .parallel.caches import diffusers_hooks

    return any(getattr(hook, "_is_stateful", False) for _, hook in diffusers_hooks(transformer))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and torch.equal(a, b.to(a.device, a.dtype)))


class CFGPairing:
    """cfg_degree 2 under a stock pipeline: CFG group 0 computes the cond call's prediction, group 1 the
    uncond one at the same time; the uncond call that follows returns group 1's (exactly what it would
    compute). A call that is not such a pair is computed as asked by both groups (exact, redundant), and so is
    every call while a stateful diffusers hook (a cache) is on the transformer."""

    def __init__(self, pipe, capture: _PromptCapture, engine):
        self.pipe = pipe
        self.capture = capture
        self.engine = engine
        self.pending = None  # (latents, timestep, negative text inputs, uncond prediction)

    def _negative_for(self, args, kwargs):
        texts = self.capture.texts
        if not self.capture.family.pipeline_uses_cfg(self.pipe) or len(texts) < 2:
            return None
        positive, negative = texts
        if not all(_same(call_input(args, kwargs, name), value) for name, value in positive.items()):
            return None
        return negative

    def decide(self, args, kwargs):
        """How the engine runs this call: ("cached", the uncond prediction computed at the paired cond call),
        ("pair", the negative text inputs CFG group 1 uses) or ("plain", None)."""
        self.capture.transformer_called()
        pending, self.pending = self.pending, None
        if _stateful_hooks(self.engine.transformer):
            return "plain", None
        hidden_states, timestep = call_input(args, kwargs, "hidden_states"), call_input(args, kwargs, "timestep")
        if (pending is not None and _same(hidden_states, pending[0]) and _same(timestep, pending[1])
                and all(_same(call_input(args, kwargs, name), value) for name, value in pending[2].items())):
            return "cached", pending[3]
        negative = self._negative_for(args, kwargs)
        return ("plain", None) if negative is None else ("pair", negative)

    def uncond_inputs(self, args, kwargs, negative):
        """The call's (args, kwargs) with the negative prompt's text inputs, each as the call's own (device, dtype)."""
        for name, value in negative.items():
            mine = call_input(args, kwargs, name)
            value = value if value is None or mine is None else value.to(mine.device, mine.dtype)
            args, kwargs = with_input(args, kwargs, name, value)
        return args, kwargs

    def remember(self, hidden_states, timestep, negative, uncond):
        """After a paired cond call: the uncond call that follows with these inputs gets `uncond`."""
        self.pending = (hidden_states, timestep, negative, uncond)
