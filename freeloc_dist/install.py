"""apply_freeloc: install FreeLOC on a built diffusers WanTransformer3DModel (DESIGN 9)."""

from __future__ import annotations

from .attention import get_backend
from .processor import FreeLOCAttnProcessor, FreeLOCState, grid_of
from .profile import ProfileError, load_profile
from .rope import temporal_rope_of

_HOOK_ATTR = "_freeloc_hook"


def apply_freeloc(transformer, profile, backend: str = "sdpa"):
    """Give every self-attention layer the kind the profile assigns it; returns the transformer.

    The token grid (F, H, W) is read from each forward's input, so one installed model renders any
    length; when F <= trained_frames every layer runs stock attention. Calling it again replaces
    the previous installation.
    """
    prof = load_profile(profile)
    blocks = transformer.blocks
    if prof.num_layers != len(blocks):
        raise ProfileError(
            f"profile for {prof.model!r} lists {prof.num_layers} layers, the transformer has {len(blocks)}"
        )
    state = FreeLOCState(prof, temporal_rope_of(transformer), get_backend(backend).run)
    for block, kind in zip(blocks, prof.kinds):
        block.attn1.set_processor(FreeLOCAttnProcessor(kind, state))

    old = getattr(transformer, _HOOK_ATTR, None)
    if old is not None:
        old.remove()

    def record_grid(module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        state.grid = grid_of(module, hidden_states)

    setattr(transformer, _HOOK_ATTR, transformer.register_forward_pre_hook(record_grid, with_kwargs=True))
    transformer.freeloc_state = state
    return transformer
