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


class LengthGraphs:
    """The compiled block graphs of one video shape at a time, for a prompt queue whose jobs differ in length.

    Every transformer block (of both experts) runs one code object, and dynamo guards its graphs on the layer's
    kind and the video's grid (FreeLOC plans attention per length in Python): each length past T adds a graph
    per layer kind, so dynamo's per-code-object recompile limit (8) is reached by the third length, and under
    fullgraph=True that fails the job (FailOnRecompileLimitHit) instead of running eagerly. So in blocks mode a
    job whose shape differs from the previous job's starts from fresh graphs (torch._dynamo.reset): the limit
    then counts one length's graphs. A queue that alternates lengths compiles each switch again (block graphs
    compile in seconds to a minute); full mode keeps its graphs (one per length, past 8 it runs eagerly)."""

    def __init__(self, mode: str, profiles=()):
        """`profiles`: each expert's FreeLOC profile (None: stock attention). One length needs a graph per layer
        spec of each expert and a stock one; dynamo's limit is raised to that where it is below."""
        self.mode = mode
        self.shape: tuple | None = None
        if mode == "blocks":
            needed = sum(1 + (len({p.layer_spec(i) for i in range(p.num_layers)}) if p is not None else 0)
                         for p in profiles)
            import torch._dynamo.config as dynamo_config

            if needed > dynamo_config.recompile_limit:
                dynamo_config.recompile_limit = needed

    def start_job(self, shape: tuple) -> bool:
        """Before a job of video `shape` (frames, height, width); returns whether the graphs were dropped."""
        changed = self.shape is not None and shape != self.shape
        self.shape = shape
        if self.mode != "blocks" or not changed:
            return False
        import torch

        torch._dynamo.reset()
        return True
