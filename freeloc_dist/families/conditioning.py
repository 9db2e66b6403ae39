"""Image conditioning carried as extra input channels (Wan's image-to-video, HunyuanVideo 1.5's both tasks): built
once per render for the WHOLE video, on every rank alike, and sliced per rank exactly like the latents
(`input_for(latents, start, end)`), so nothing here knows about ranks and the model code stays stock. Each family
subclasses it with what else its transformer takes (`transformer_kwargs`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ChannelConditioning:
    latents: torch.Tensor  # [1, K, F, H, W]: the channels appended to the noise latents, whole video

    def input_for(self, latents: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """The transformer input of latents [1, C, e - s, H, W] that are frames [start, end) of the video:
        those frames' conditioning appended on the channels."""
        end = self.latents.shape[2] if end is None else end
        assert latents.shape[2] == end - start, (latents.shape, start, end)
        return torch.cat([latents, self.latents[:, :, start:end].to(latents.dtype)], dim=1)

    def transformer_kwargs(self) -> dict:
        """Extra keyword arguments of every transformer call (both CFG passes)."""
        return {}
