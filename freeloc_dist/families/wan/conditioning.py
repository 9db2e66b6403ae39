"""Image conditioning of an image-to-video render (Wan2.1 I2V 480P/720P, Wan2.2 I2V-A14B, Wan2.1 FLF2V).

Built once per render for the WHOLE video, on every rank alike (deterministic: the same tensors as one
process), and handed to the predict function as a `Conditioning`; a sequence-parallel engine slices it per
rank exactly like the latents (`input_for(latents, start, end)`), so nothing here knows about ranks and the
model code stays stock. What diffusers' WanImageToVideoPipeline feeds its transformer (0.42 source):

- transformer input, channels: C noise latents + 4 mask + C conditioning latents (C = the VAE's z_dim).
- conditioning latents: the VAE encoding (distribution mode, then (z - latents_mean) / latents_std) of a
  pixel video of V frames that holds the image at frame 0 and zeros elsewhere (FLF2V: the last image at
  frame V-1).
- mask: 4 channels per latent frame, one per video frame that latent frame stands for. Latent frame 0
  stands for video frame 0 (four times); latent frame f >= 1 for video frames 4f-3 .. 4f. A channel is 1
  where its video frame is a given image: latent frame 0 entirely; FLF2V also the last latent frame's
  last channel (video frame V-1), nothing else.
- Wan2.1 (transformer `image_dim` set): CLIP's penultimate hidden states of the image (FLF2V: of both
  images, which the transformer's image embedder joins into one sequence), passed as
  `encoder_hidden_states_image` to both CFG passes. They go in front of the text tokens, and diffusers'
  attention splits them off at `tokens - 512`, so the text is exactly 512 tokens (preflight checks it).
  Wan2.2 I2V-A14B has no image encoder.

Shapes: B = 1, C latent channels, F latent frames, H/W latent cells, V video frames, Hp/Wp pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import ChannelConditioning
from .vae import latent_stats, vae_scale_factors

MASK_CHANNELS = 4
TEXT_TOKENS_WITH_IMAGE = 512  # WanAttnProcessor's hard-coded text length when image tokens come first


@dataclass(frozen=True)
class Conditioning(ChannelConditioning):
    # latents [1, 4 + C, F, H, W]: mask then VAE latents, the whole video (transformer dtype)
    image_embeds: torch.Tensor | None  # [images, tokens, D] CLIP hidden states, or None (no image encoder)

    def transformer_kwargs(self) -> dict:
        return {} if self.image_embeds is None else {"encoder_hidden_states_image": self.image_embeds}


def sink_frames(latent_frames: int, last_image: bool) -> tuple[int, ...]:
    """The latent frames that hold a given image: TSA's default sinks for a conditioned render."""
    return (0, latent_frames - 1) if last_image and latent_frames > 1 else (0,)


def frame_mask(latent_frames: int, temporal: int, last_image: bool, height: int, width: int) -> torch.Tensor:
    """The mask channels [1, temporal, F, H, W] (float32)."""
    video_frames = temporal * (latent_frames - 1) + 1
    given = torch.zeros(video_frames)
    given[0] = 1.0
    if last_image:
        given[-1] = 1.0
    f = torch.arange(latent_frames)[None, :]
    c = torch.arange(temporal)[:, None]
    video_index = (f * temporal + c - (temporal - 1)).clamp(min=0)  # [temporal, F]; latent frame 0 -> frame 0
    mask = given[video_index]
    return mask[None, :, :, None, None].expand(1, temporal, latent_frames, height, width).contiguous()


def pixel_tensor(image) -> torch.Tensor:
    """An RGB PIL image -> [1, 3, Hp, Wp] float32 in [-1, 1] (diffusers' VaeImageProcessor normalisation)."""
    import numpy as np

    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [Hp, Wp, 3]
    return (array.permute(2, 0, 1)[None] * 2.0 - 1.0).contiguous()


def image_pixels(cfg, device) -> torch.Tensor:
    """The config's `image` read and fitted to the render size, as [1, 3, Hp, Wp] in [-1, 1] on `device` (Wan2.2
    TI2V's image mode: the clean first frame)."""
    from ...images import fit, load_image

    return pixel_tensor(fit(load_image(cfg.image, "image"), cfg.video.height, cfg.video.width)).to(device)


@torch.inference_mode()
def encode_video_condition(vae, first: torch.Tensor, last: torch.Tensor | None, video_frames: int) -> torch.Tensor:
    """Normalised VAE latents [1, C, F, H, W] (float32) of the conditioning video (images in [-1, 1])."""
    device = next(vae.parameters()).device
    _, ch, hp, wp = first.shape
    middle = video_frames - 1 - (last is not None)
    parts = [first[:, :, None], first.new_zeros(1, ch, middle, hp, wp)]
    if last is not None:
        parts.append(last[:, :, None])
    video = torch.cat(parts, dim=2).to(device=device, dtype=vae.dtype)  # [1, 3, V, Hp, Wp]
    z = vae.encode(video).latent_dist.mode().float()
    mean, std = latent_stats(vae, z.device)
    return (z - mean) / std


@torch.inference_mode()
def encode_clip(image_encoder, image_processor, images: list) -> torch.Tensor:
    """CLIP's penultimate hidden states [len(images), tokens, D] of PIL images."""
    device = next(image_encoder.parameters()).device
    pixels = image_processor(images=images, return_tensors="pt").to(device)
    return image_encoder(**pixels, output_hidden_states=True).hidden_states[-2]


def build_conditioning(components, image, last_image, *, frames: int, height: int, width: int,
                       device, dtype: torch.dtype) -> Conditioning:
    """The Conditioning of a render: `image` / `last_image` are RGB PIL images as read
    (freeloc_dist.images.load_image; None: no last image); `frames` video frames at height x width."""
    from ...images import fit

    vae = components.vae
    temporal, spatial = vae_scale_factors(vae)
    first_px = pixel_tensor(fit(image, height, width))
    last_px = pixel_tensor(fit(last_image, height, width)) if last_image is not None else None
    latents = encode_video_condition(vae, first_px, last_px, frames)
    f, h, w = latents.shape[2:]
    assert (f, h, w) == ((frames - 1) // temporal + 1, height // spatial, width // spatial), latents.shape
    mask = frame_mask(f, temporal, last_image is not None, h, w).to(latents.device)
    cond = torch.cat([mask, latents], dim=1).to(device=device, dtype=dtype)
    embeds = None
    if components.transformer.config.image_dim is not None:
        if components.image_encoder is None or components.image_processor is None:
            raise ValueError("this model's transformer takes CLIP image tokens, but it has no image_encoder")
        shown = [image] if last_image is None else [image, last_image]
        embeds = encode_clip(components.image_encoder, components.image_processor, shown).to(device=device,
                                                                                            dtype=dtype)
    return Conditioning(latents=cond, image_embeds=embeds)


def use_condition_sinks(transformer, sinks: tuple[int, ...]) -> None:
    """TSA's sink frames become the conditioning frames on a transformer with FreeLOC installed, unless its
    profile sets `tsa.sink_frames` itself (then the profile wins). Per render: the last frame moves with F."""
    import dataclasses

    from ...plan import TSAParams

    state = getattr(transformer, "freeloc_state", None)
    profile = getattr(state, "profile", None)
    if profile is None or profile.tsa_sinks_given or "tsa" not in profile.kinds:
        return
    tsa = dataclasses.replace(profile.tsa or TSAParams(), sink_frames=tuple(sinks))
    state.profile = dataclasses.replace(profile, tsa=tsa)


def condition_of_render(components, cfg, *, device, dtype: torch.dtype) -> Conditioning:
    """The Conditioning of a render config (`image`, `last_image`, video size), with every expert's TSA sinks
    set to the conditioning frames (`use_condition_sinks`)."""
    from ...images import load_image

    image = load_image(cfg.image, "image")
    last = load_image(cfg.last_image, "last_image") if cfg.last_image is not None else None
    condition = build_conditioning(components, image, last, frames=cfg.video.frames, height=cfg.video.height,
                                   width=cfg.video.width, device=device, dtype=dtype)
    sinks = sink_frames(condition.latents.shape[2], last is not None)
    for transformer in components.experts():
        use_condition_sinks(transformer, sinks)
    return condition


def token_timesteps_of(components, geometry, image: torch.Tensor | None, device):
    """Per-token timesteps of an expand_timesteps model (Wan2.2 TI2V), with the encoded first frame in image
    mode; None for every other model (which takes no image here: I2V models condition through channels)."""
    if not components.expand_timesteps:
        if image is not None:
            raise ValueError("a conditioning image needs an expand_timesteps (Wan2.2 TI2V) model here")
        return None
    from .token_timesteps import encode_first_frame, token_timesteps

    first = None
    if image is not None:
        spatial = vae_scale_factors(components.vae)[1]
        want = (geometry.height * spatial, geometry.width * spatial)
        if tuple(image.shape[-2:]) != want:
            raise ValueError(f"conditioning image is {tuple(image.shape[-2:])} (H, W), the render is {want}")
        first = encode_first_frame(components.vae, image)
    return token_timesteps(geometry.frames, geometry.height, geometry.width,
                           tuple(components.transformer.config.patch_size), first, device)


def render_inputs(components, cfg, geometry, image: torch.Tensor | None, device, dtype: torch.dtype):
    """(condition, token_timesteps) of a render of `cfg` (freeloc_dist.families.Family.render_inputs): the
    image-to-video Conditioning of the whole video (TSA sinks on its frames) or None; Wan2.2 TI2V's per-token
    timesteps (its image mode: `image`, else the config's image, is the clean first frame) or None."""
    condition = None
    if cfg.image is not None and not components.expand_timesteps:
        condition = condition_of_render(components, cfg, device=device, dtype=dtype)
    elif cfg.image is not None and image is None:  # Wan2.2 TI2V image mode: the image is the clean first frame
        image = image_pixels(cfg, device)
    return condition, token_timesteps_of(components, geometry, image, device)
