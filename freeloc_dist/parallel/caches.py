"""diffusers' caches under sequence parallelism: every data-dependent decision made once for the whole video.

A cache hook that decides from activations would see only this rank's frames, so the ranks would decide apart
(one skipping the collectives the others wait in) and none would decide as one process does. The engine finds
such hooks on the transformer at every global call and makes each decision global (`make_global`):
- first block cache (`fbc_leader_block_hook`): mean |residual change| / mean |previous residual| of the first
  block. The sums of both and the token count are summed over the sp group, so N ranks compare the same number
  with the threshold as one process (not an average of per-rank ratios).
- SeaCache (`sea_cache_root`): its indicator filters the transformer's input latents with an FFT over frames,
  height and width, which does not split by frame. Its callback is given the whole video's input, which every
  rank holds: every rank computes the one-process indicator, with no collective.
- MagCache (`mag_cache_block_hook`): decides from its step count and the given magnitude ratios; only its
  calibration averages per-token norm ratios, and those sums are summed over the sp group.
Pyramid attention broadcast, TaylorSeer, TextKVCache and FasterCache decide by step count and timestep, which are
the same on every rank (their per-token state is this rank's tokens, as the forward is).
A hook of a deciding cache whose decision function is not where this module patches it (another diffusers
version) is refused with one line naming the cache. `release` puts every patched function back.
"""

from __future__ import annotations

import torch

_MARK = "_freeloc_global"  # on a patched hook: (engine, restore function)


def diffusers_hooks(transformer) -> list:
    """(name, hook) of every diffusers HookRegistry hook on the transformer and its modules."""
    return [(name, hook) for module in transformer.modules()
            for name, hook in getattr(getattr(module, "_diffusers_hook", None), "hooks", {}).items()]


def make_global(transformer, engine) -> None:
    """Patch every deciding cache hook on `transformer` (once per engine) so that its decision is the whole
    video's; a no-op without sequence parallelism."""
    if engine.dims.sp_degree == 1:
        return
    for name, hook in diffusers_hooks(transformer):
        patch = _PATCHES.get(name)
        if patch is None or (hook.__dict__.get(_MARK) or (None,))[0] is engine:
            continue
        _restore(hook)  # a hook patched by an earlier engine on this transformer
        hook.__dict__[_MARK] = (engine, patch(hook, engine))


def release(transformer) -> None:
    """Undo `make_global` on every hook of `transformer`."""
    for _, hook in diffusers_hooks(transformer):
        _restore(hook)


def _restore(hook) -> None:
    mark = hook.__dict__.pop(_MARK, None)
    if mark is not None:
        mark[1]()


def _refuse(cache: str, missing: str) -> RuntimeError:
    return RuntimeError(f"parallelize_pipeline: diffusers' {cache} decides from activations and this diffusers has no "
                        f"{missing} to make its decision global over the ranks; disable it "
                        "(transformer.disable_cache()) or render on one process")


def _first_block(hook, engine):
    """First block cache: the relative change of the first block's residual, over the whole video."""
    if not callable(getattr(type(hook), "_should_compute_remaining_blocks", None)) or not hasattr(
            hook, "state_manager"):
        raise _refuse("first block cache", "FBCHeadBlockHook._should_compute_remaining_blocks")

    @torch.compiler.disable
    def should_compute(residual):
        previous = hook.state_manager.get_state().head_block_residual
        if previous is None:
            return True
        local = torch.stack([(residual - previous).abs().double().sum(), previous.abs().double().sum(),
                             torch.tensor(float(residual.numel()), dtype=torch.float64, device=residual.device)])
        change, size, count = engine.comm.sp_sum(local, tag="cache").tolist()
        # the means in the residual's dtype, as one process's .mean() gives them, then their ratio
        dtype = residual.dtype
        ratio = torch.tensor(change / count, dtype=dtype) / torch.tensor(size / count, dtype=dtype)
        return ratio.item() > hook.threshold

    hook._should_compute_remaining_blocks = should_compute
    return lambda: hook.__dict__.pop("_should_compute_remaining_blocks", None)


def _sea(hook, engine):
    """SeaCache: the indicator of the whole video's input latents, on every rank."""
    if not hasattr(hook, "raw_vision_callback"):
        raise _refuse("SeaCache", "SeaCacheRootHook.raw_vision_callback")
    original = hook.raw_vision_callback
    if original is None:  # no indicator: SeaCache runs every call in full, on every rank alike
        return lambda: None

    def whole_video(module, args, kwargs):
        hidden = engine.global_input()
        if hidden is not None:
            args, kwargs = _with_hidden(module, args, kwargs, hidden)
        return original(module, args, kwargs)

    hook.raw_vision_callback = whole_video

    def restore():
        hook.raw_vision_callback = original
    return restore


def _mag(hook, engine):
    """MagCache: only calibration reads activations (per-token norm ratios, averaged over the whole video)."""
    if not callable(getattr(type(hook), "_perform_calibration_step", None)):
        raise _refuse("MagCache", "MagCacheBlockHook._perform_calibration_step")

    def calibration_step(state, residual):
        if state.previous_residual is None:
            state.calibration_ratios.append(1.0)
            return
        current = torch.linalg.norm(residual.float(), dim=-1)
        previous = torch.linalg.norm(state.previous_residual.float(), dim=-1)
        ratios = current / (previous + 1e-8)
        local = torch.stack([ratios.double().sum(),
                             torch.tensor(float(ratios.numel()), dtype=torch.float64, device=ratios.device)])
        total, count = engine.comm.sp_sum(local, tag="cache").tolist()
        state.calibration_ratios.append(total / count)

    hook._perform_calibration_step = calibration_step
    return lambda: hook.__dict__.pop("_perform_calibration_step", None)


_PATCHES = {"fbc_leader_block_hook": _first_block, "sea_cache_root": _sea, "mag_cache_block_hook": _mag}


def _with_hidden(module, args, kwargs, hidden):
    """The call's arguments with `hidden_states` (the first) replaced."""
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}
