"""model.compile: torch.compile a (FreeLOC-installed, possibly parallelised) Wan transformer in place."""

from __future__ import annotations

from .choices import COMPILE_MODES as MODES


def compile_transformer(transformer, mode: str) -> bool:
    """blocks: diffusers' compile_repeated_blocks(fullgraph=True); full: transformer.compile() (in place,
    so pipelines and hooks keep the same module). Returns whether anything was compiled."""
    if mode not in MODES:
        raise ValueError(f"model.compile={mode!r}: choose one of {', '.join(MODES)}")
    if mode == "blocks":
        transformer.compile_repeated_blocks(fullgraph=True)
    elif mode == "full":
        transformer.compile()
    return mode != "none"
