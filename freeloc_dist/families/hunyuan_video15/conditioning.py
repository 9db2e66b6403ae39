"""HunyuanVideo 1.5's conditioning inputs, as its pipelines build them (diffusers 0.42 source).

- Transformer input, channels: C noise latents + C conditioning latents + 1 mask (in_channels = 2 C + 1), for both
  tasks. Text-to-video: conditioning and mask are zeros. Image-to-video: latent frame 0 of the conditioning is
  the VAE encoding (distribution mode, x scaling_factor) of the image fitted to the video size, the other frames
  zeros; the mask is 1 on latent frame 0.
- Image tokens (`image_embeds`): image-to-video passes SigLIP's last hidden state of the (fitted) image, which
  the transformer joins to the text tokens; text-to-video passes 729 zero tokens that the transformer masks out,
  passed here as none at all (the same video output; text.py drops padded text the same way).

The whole video's conditioning is built once per render on every rank alike and sliced per rank like the latents
(families/conditioning.py). TSA's default sink, frame 0, is the image's frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..conditioning import ChannelConditioning


@dataclass(frozen=True)
class Hunyuan15Conditioning(ChannelConditioning):
    # latents [1, C + 1, F, H, W]: conditioning latents then the mask, the whole video (transformer dtype)
    image_embeds: torch.Tensor  # [1, N, D] SigLIP states (N = 0 for text-to-video)

    def transformer_kwargs(self) -> dict:
        return {"image_embeds": self.image_embeds}


@torch.inference_mode()
def encode_image_latent(vae, image) -> torch.Tensor:
    """Latent [1, C, 1, H, W] of an RGB PIL image already at the video size (the pipeline's _get_image_latents:
    its processor's [-1, 1] pixels, the distribution's mode, x scaling_factor)."""
    from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor

    processor = HunyuanVideo15ImageProcessor(vae_scale_factor=vae.spatial_compression_ratio, do_resize=False,
                                             do_convert_rgb=True)
    device = next(vae.parameters()).device
    pixels = processor.preprocess(image, height=image.height, width=image.width).to(device, dtype=vae.dtype)
    return vae.encode(pixels.unsqueeze(2)).latent_dist.mode() * vae.config.scaling_factor


@torch.inference_mode()
def encode_siglip(image_encoder, image_processor, image) -> torch.Tensor:
    """SigLIP's last hidden state [1, N, D] of an RGB PIL image (the pipeline's _get_image_embeds)."""
    if image_encoder is None or image_processor is None:
        raise ValueError("this image-to-video model has no image_encoder / feature_extractor loaded")
    device = next(image_encoder.parameters()).device
    pixels = image_processor.preprocess(images=image, do_resize=True, return_tensors="pt", do_convert_rgb=True)
    pixels = pixels.to(device=device, dtype=next(image_encoder.parameters()).dtype)
    return image_encoder(**pixels).last_hidden_state


def build_conditioning(components, image, *, latent_shape: tuple[int, ...], height: int, width: int, device,
                       dtype: torch.dtype) -> Hunyuan15Conditioning:
    """The conditioning of a render of latents `latent_shape` [1, C, F, H, W]; `image` an RGB PIL image as read
    (freeloc_dist.images.load_image), or None (text-to-video)."""
    _, c, f, h, w = latent_shape
    cond = torch.zeros(1, c + 1, f, h, w, dtype=torch.float32)
    embed_dim = components.transformer.config.image_embed_dim
    embeds = torch.zeros(1, 0, embed_dim)
    if image is not None:
        from ...images import fit

        shown = fit(image, height, width)
        cond[:, :c, :1] = encode_image_latent(components.vae, shown).float().cpu()
        cond[:, c, 0] = 1.0
        embeds = encode_siglip(components.image_encoder, components.image_processor, shown).cpu()
    return Hunyuan15Conditioning(latents=cond.to(device=device, dtype=dtype),
                                 image_embeds=embeds.to(device=device, dtype=dtype))
