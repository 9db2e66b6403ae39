"""Per-token timesteps and first-frame conditioning of Wan2.2 TI2V-5B (`expand_timesteps` in model_index.json).

The TI2V transformer takes one timestep per token instead of one per video. In text mode every token gets the
step's t: the same math as a scalar t, computed per token (as diffusers' WanPipeline calls this model; 3e-7
apart from a scalar t on the tiny model).
In image mode the conditioning image is encoded once by the VAE into a clean latent frame; frame 0 of the
transformer input is that latent at every step and its tokens get timestep 0, so the model treats it as
already denoised, and the final latents carry it in frame 0. The scheduler itself still steps frame 0 of its
own latents; only the transformer input and the result are blended (diffusers' WanImageToVideoPipeline with
expand_timesteps, which the tests compare against).

Everything here is built for the whole video: a sequence-parallel rank slices the per-token timesteps exactly
like its latent frames (tokens are frame-major, so frames [s, e) are tokens [s n, e n), n tokens per frame;
freeloc_dist.parallel.engine), and the blend happens on the global latents before the engine slices them.

Shapes (legend): B batch (1), C latent channels (48), F latent frames, H/W latent cells, h/w tokens per frame
axis (H / patch, W / patch), L = F h w tokens, Hp/Wp pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .vae import latent_stats


@dataclass(frozen=True)
class TokenTimesteps:
    """One render's per-token timesteps, and in image mode its clean first latent frame."""

    frame_mask: torch.Tensor  # [1, 1, F, h, w] float32: 0 where a token is conditioning (frame 0), else 1
    first_frame: torch.Tensor | None  # [1, C, 1, H, W] float32 normalised clean latent (None: text mode)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The transformer's timesteps [B=1, L] of step t (frame-major, as diffusers flattens them)."""
        return (self.frame_mask[0, 0] * t).flatten().unsqueeze(0)

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [1, C, F, H, W] with frame 0 replaced by the clean latent (image mode); unchanged otherwise."""
        if self.first_frame is None:
            return latents
        out = latents.clone()
        out[:, :, :1] = self.first_frame.to(latents.dtype)
        return out

    finish = model_input  # the final latents carry the clean frame too


def token_timesteps(num_frames: int, height: int, width: int, patch: tuple[int, int, int],
                    first_frame: torch.Tensor | None = None, device="cpu") -> TokenTimesteps:
    """Timestep layout of a video of latent grid (F, H, W) for a transformer patch (1, ph, pw)."""
    pt, ph, pw = patch
    if pt != 1 or height % ph or width % pw:
        raise ValueError(f"latent grid {num_frames}x{height}x{width} does not fit the patch {tuple(patch)}")
    mask = torch.ones(1, 1, num_frames, height // ph, width // pw, dtype=torch.float32, device=device)
    if first_frame is not None:
        if tuple(first_frame.shape[2:]) != (1, height, width):
            raise ValueError(f"first-frame latent {tuple(first_frame.shape)} does not fit the video's latent grid "
                             f"{height}x{width}")
        mask[:, :, 0] = 0.0
        first_frame = first_frame.to(device=device, dtype=torch.float32)
    return TokenTimesteps(mask, first_frame)


@torch.inference_mode()
def encode_first_frame(vae, image: torch.Tensor) -> torch.Tensor:
    """The conditioning image [1, 3, Hp, Wp] (or [3, Hp, Wp]) in [-1, 1], already at the render size, to the
    normalised clean latent frame [1, C, 1, H, W] float32: the VAE posterior's mode, then (z - mean) / std
    per channel, the latents' normalisation (families/wan/vae.py's denormalise undoes it)."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[:2] != (1, 3):
        raise ValueError(f"conditioning image: expected [1, 3, H, W] in [-1, 1], got {tuple(image.shape)}")
    device = next(vae.parameters()).device
    x = image[:, :, None].to(device=device, dtype=vae.dtype)  # [1, 3, 1, Hp, Wp]
    z = vae.encode(x).latent_dist.mode().float()  # [1, C, 1, H, W]
    mean, std = latent_stats(vae, z.device)
    return (z - mean) * (1.0 / std)  # times the reciprocal, as diffusers' WanPipeline (bitwise its latents)
