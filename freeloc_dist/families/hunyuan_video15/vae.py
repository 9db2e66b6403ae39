"""HunyuanVideo 1.5's VAE (diffusers' AutoencoderKLHunyuanVideo15): compression factors and a streaming decode of
the project's own, with memory that does not grow with the square of the video's length.

diffusers decodes a whole video at once, and its mid-block attention builds a dense causal mask over every token
of every latent frame in a Python loop: (F h w)^2 floats, 150 GB at 121 latent frames of 848x480 (4x), before
the decoder's activations for every frame. The decoder is causal in time everywhere: causal 3D convolutions
(each output frame sees its input frame and the two before it, replicate-padded before frame 0), per-position
norms, the frame-causal attention (a token sees every token of its own and earlier frames), and upsamplers that
treat the video's first frame apart. So it decodes exactly one latent frame at a time (`stream_decode`) when
each causal convolution keeps its last two input frames, each attention keeps the keys and values of the frames
so far (a query frame then attends all of them: no mask), and the upsamplers know whether the chunk is the
first. Memory: one latent frame's activations plus the attention's keys and values, 2 x 4 bytes x channels x h w
per latent frame (13 MB at 848x480 with the published 1024 channels, 1.6 GB at 121 latent frames).

Output equals diffusers' decode up to float rounding (other convolution and attention shapes; tested to 1e-5 on
the tiny VAE). A range of frames needs every frame before it (the attention), so ranks do not split the decode
(`can_decode_ranges` False): rank 0 streams the whole video. Spatial tiling (vae.use_tiling) is not combined with
streaming (each tile would need its own state); the render does not enable it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ...video import to_uint8


def vae_scale_factors(vae) -> tuple[int, int]:
    return int(vae.temporal_compression_ratio), int(vae.spatial_compression_ratio)


def can_decode_ranges(vae) -> bool:
    return False  # each frame depends on every earlier one (the mid-block attention): no range alone


class _Stream:
    """What one streaming decode carries from a latent frame to the next."""

    def __init__(self):
        self.first = True  # the chunk holds the video's first frame
        self.conv_inputs: dict[int, torch.Tensor] = {}  # causal conv -> its last kt - 1 input frames
        self.keys_values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # attention -> k, v of frames so far


def _causal_conv(module, state: _Stream):
    pad_w, _, pad_h, _, pad_t, _ = module.time_causal_padding

    def forward(x):
        before = state.conv_inputs.get(id(module))
        if before is None:  # frame 0: replicate padding, as the stock module pads
            before = x[:, :, :1].expand(-1, -1, pad_t, -1, -1)
        x = torch.cat([before, x], dim=2)
        state.conv_inputs[id(module)] = x[:, :, x.shape[2] - pad_t:]
        return module.conv(F.pad(x, (pad_w, pad_w, pad_h, pad_h, 0, 0), mode=module.pad_mode))
    return forward


def _attention(module, state: _Stream):
    def forward(x):
        identity = x
        x = module.norm(x)
        b, c, f, h, w = x.shape
        q, k, v = (proj(x).reshape(b, c, f * h * w).permute(0, 2, 1).unsqueeze(1)
                   for proj in (module.to_q, module.to_k, module.to_v))
        past = state.keys_values.get(id(module))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        state.keys_values[id(module)] = (k, v)
        out = F.scaled_dot_product_attention(q, k, v)  # one query frame: every key so far is earlier or its own
        out = out.squeeze(1).reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)
        return module.proj_out(out) + identity
    return forward


def _upsample(module, state: _Stream):
    stock = module.forward

    def forward(x):
        if state.first or not module.add_temporal_upsample:
            return stock(x)
        # past the first frame every frame is one of the stock module's "next" frames
        h = module._dcae_upsample_rearrange(module.conv(x), r1=2, r2=2, r3=2)
        shortcut = module._dcae_upsample_rearrange(x, r1=2, r2=2, r3=2).repeat_interleave(module.repeats, dim=1)
        return h + shortcut
    return forward


@contextlib.contextmanager
def _streaming(decoder, state: _Stream):
    from diffusers.models.autoencoders.autoencoder_kl_hunyuanvideo15 import (
        HunyuanVideo15AttnBlock,
        HunyuanVideo15CausalConv3d,
        HunyuanVideo15Upsample,
    )

    patch = {HunyuanVideo15CausalConv3d: _causal_conv, HunyuanVideo15AttnBlock: _attention,
             HunyuanVideo15Upsample: _upsample}
    patched = [m for m in decoder.modules() if type(m) in patch]
    for m in patched:
        m.forward = patch[type(m)](m, state)
    try:
        yield
    finally:
        for m in patched:
            del m.forward  # the class's forward again


@torch.inference_mode()
def stream_decode(vae, z: torch.Tensor) -> Iterator[torch.Tensor]:
    """Decoded video frames [1, 3, t, Hp, Wp] of VAE latents z [1, C, F, H, W] (already / scaling_factor), one
    latent frame at a time, in order (1 frame, then 4 per latent frame)."""
    state = _Stream()
    with _streaming(vae.decoder, state):
        for f in range(z.shape[2]):
            yield vae.decoder(z[:, :, f:f + 1])
            state.first = False


def iter_decode(vae, latents: torch.Tensor, start: int = 0, end: int | None = None) -> Iterator[np.ndarray]:
    """uint8 chunks [t, Hp, Wp, 3] of the whole video of latents [1, C, F, H, W] (the pipeline's latents: the VAE
    gets latents / scaling_factor)."""
    num_frames = latents.shape[2]
    end = num_frames if end is None else end
    assert (start, end) == (0, num_frames), "this VAE decodes whole videos only (can_decode_ranges)"
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    for chunk in stream_decode(vae, z):
        yield to_uint8(chunk)
