"""HunyuanVideo's embedded guidance as a render input: the transformer's `guidance` argument (the scale x 1000,
as HunyuanVideoPipeline passes it), the same for the conditional and the unconditional pass and on every rank.
It takes the conditioning slot of the render loop (input_for / transformer_kwargs), which carries such per-render
inputs to every transformer call; the latents pass through unchanged.
"""

from __future__ import annotations

import torch


class EmbeddedGuidance:
    def __init__(self, scale: float, device, dtype):
        self.guidance = torch.tensor([scale], dtype=dtype, device=device) * 1000.0  # [B = 1]

    def input_for(self, x, start=None, end=None):
        return x

    def transformer_kwargs(self) -> dict:
        return {"guidance": self.guidance}
