"""apply_freeloc / remove_freeloc: the one place that installs processors on a diffusers transformer of a
supported family (the attention layers are the family adapter's, freeloc_dist.families).

An installation is three things, all found again from the model itself (nothing held in a handle a
`copy.deepcopy` could not follow): the processors of every attention layer FreeLOC replaces (each keeps the
processor it replaced), a forward pre-hook object that records the token grid, and the
`freeloc_state` attribute. Removing puts back the replaced processor objects and drops the hook and
the attribute, so the model is bitwise stock again. FreeLOC (and the probe, and the parallel engine)
install through `install_processors`; `apply_freeloc` is the public entry point (DESIGN 9).
"""

from __future__ import annotations

from .attention import get_backend
from .families import family_of
from .processor import PARALLEL_HINT, FreeLOCAttnProcessor, FreeLOCState
from .profile import ProfileError, load_profile


class GridHook:
    """Forward pre-hook recording each forward's token grid (F, H, W) into `state.grid`.

    A class, not a closure: deepcopy copies it along with the state it points to, so a copied model
    records into its own state."""

    def __init__(self, state):
        self.state = state

    def __call__(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        self.state.grid = self.state.family.grid_of(module, hidden_states)
        on_forward = getattr(self.state, "on_forward", None)
        if on_forward is not None:
            on_forward()


class _RefuseDiffusersParallelism:
    """Stands in for `transformer.enable_parallelism` while our processors are installed: diffusers'
    context parallelism would split the sequence under processors that assume they see all of it."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            "diffusers' enable_parallelism is not supported on a transformer with FreeLOC or the freeloc_dist "
            f"engine installed (its context parallelism bypasses their attention); {PARALLEL_HINT}"
        )


def check_not_diffusers_parallel(transformer) -> None:
    """Refuse a model diffusers already parallelised (enable_parallelism, from_pretrained(parallel_config=))."""
    cp = getattr(transformer, "_parallel_config", None) is not None or any(
        getattr(getattr(m, "processor", None), "_parallel_config", None) is not None for m in transformer.modules()
    )
    if cp:
        raise RuntimeError(
            "this transformer has diffusers parallelism enabled (enable_parallelism / parallel_config); FreeLOC "
            f"cannot be installed on it; load it without parallelism and {PARALLEL_HINT}"
        )


def installed_processors(transformer):
    """(attention layer, processor) of every FreeLOC layer carrying a processor installed here."""
    layers = family_of(transformer).attention_layers(transformer)
    return [(attn, attn.processor) for attn in layers if hasattr(attn.processor, "replaced")]


def install_processors(transformer, make_processor, state, *, on_forward=None):
    """Give every FreeLOC attention layer `make_processor(index, replaced_processor)`, record the grid into
    `state` before each forward, and guard against diffusers parallelism. Replaces any previous
    installation (FreeLOC, probe or engine): the processors restored later are always the stock ones."""
    check_not_diffusers_parallel(transformer)
    old = getattr(transformer, "freeloc_state", None)
    if old is not None and old.engine is not None:
        raise RuntimeError("this transformer is parallelised: install FreeLOC (apply_freeloc / enable_freeloc) "
                           "before parallelize_pipeline, or remove the parallelism first")
    stock = remove_freeloc(transformer)  # the original processors, whatever was installed
    for i, (attn, original) in enumerate(zip(family_of(transformer).attention_layers(transformer), stock)):
        proc = make_processor(i, original)
        proc.replaced = original
        attn.set_processor(proc)
    state.on_forward = on_forward
    transformer.register_forward_pre_hook(GridHook(state), with_kwargs=True)
    transformer.freeloc_state = state
    transformer.enable_parallelism = _RefuseDiffusersParallelism()
    return state


def remove_freeloc(transformer) -> list:
    """Restore the processors, hooks and attributes an installation replaced; returns the stock
    self-attention processors now in place. A no-op on a model without an installation."""
    state = getattr(transformer, "freeloc_state", None)
    if getattr(state, "engine", None) is not None:
        state.engine.detach()  # the engine removes the hooks it holds the handles of
        state.engine = None
    for attn, proc in installed_processors(transformer):
        attn.set_processor(proc.replaced)
    for hook_id, hook in list(transformer._forward_pre_hooks.items()):
        if isinstance(hook, GridHook):
            del transformer._forward_pre_hooks[hook_id]
            transformer._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for name in ("freeloc_state", "enable_parallelism"):
        transformer.__dict__.pop(name, None)
    return [attn.processor for attn in family_of(transformer).attention_layers(transformer)]


def snapshot(transformer):
    """The current installation (state and processors, or None), for `restore` after a temporary one."""
    state = getattr(transformer, "freeloc_state", None)
    layers = family_of(transformer).attention_layers(transformer)
    return None if state is None else (state, [attn.processor for attn in layers])


def restore(transformer, snap) -> None:
    """Remove whatever is installed now and put back the installation `snapshot` recorded."""
    remove_freeloc(transformer)
    if snap is not None:
        state, processors = snap
        install_processors(transformer, lambda i, original: processors[i], state)


class FreeLOCHandle:
    """What apply_freeloc returns: `remove()` makes the model stock again (same as remove_freeloc)."""

    def __init__(self, transformer, state):
        self.transformer = transformer
        self.state = state

    def remove(self) -> None:
        if getattr(self.transformer, "freeloc_state", None) is self.state:
            remove_freeloc(self.transformer)


def apply_freeloc(transformer, profile, backend: str = "sdpa") -> FreeLOCHandle:
    """Give every self-attention layer the kind the profile assigns it; returns a handle (`.remove()`).

    The token grid (F, H, W) is read from each forward's input, so one installed model renders any
    length; when F <= trained_frames every layer runs stock attention. Calling it again replaces the
    previous installation. Works before or after dtype/device casts and survives copy.deepcopy.
    """
    prof = load_profile(profile)
    family = family_of(transformer)
    layers = family.attention_layers(transformer)
    if prof.num_layers != len(layers):
        raise ProfileError(
            f"profile for {prof.model!r} lists {prof.num_layers} layers, the transformer has {len(layers)}"
        )
    state = FreeLOCState(family, prof, family.temporal_rope(transformer), get_backend(backend).run)
    state.backend = backend
    if family.joint_text:
        from .attention.joint import get_joint

        state.joint_attention = get_joint(backend)
    specs = [prof.layer_spec(i) for i in range(prof.num_layers)]  # "vrpr+long" on long-range layers
    install_processors(transformer, lambda i, original: FreeLOCAttnProcessor(specs[i], state), state)
    return FreeLOCHandle(transformer, state)
