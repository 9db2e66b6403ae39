"""HunyuanVideo15Family: the adapter (families/base.py) for diffusers' HunyuanVideo15Transformer3DModel, text- and
image-to-video.

The joint attention is HunyuanVideo's (DESIGN 11): every dual-stream block's attention joins text to video (video
first, text last), text with its own `add_*_proj`, norms and `to_add_out`, RoPE on video only, the same RoPE
module interface. So the attention surgery and the RoPE are HunyuanVideoFamily's, inherited; what differs is here:
54 dual-stream blocks and no single-stream ones, the joint call's mask (the text keys' mask [B, Lt], not the whole
sequence's), the text encoders (Qwen 2.5-VL + ByT5, text.py), real classifier-free guidance on
sampling.guidance_scale (the pipeline's ClassifierFreeGuidance: uncond + g (cond - uncond)), the conditioning
channels and image tokens of both tasks (conditioning.py), the VAE (vae.py) and the planner's counts.
"""

from __future__ import annotations

from ..base import Family, delegate
from ..hunyuan_video.adapter import HunyuanVideoFamily
from . import counts
from .kind import PIPELINES


class HunyuanVideo15Family(HunyuanVideoFamily):
    name = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    pipelines = PIPELINES
    text_encoder_fields = ("text_encoder", "text_encoder_2")  # Qwen and ByT5
    title = "HunyuanVideo 1.5"

    # -- model directories, inputs and VAE: this folder's modules -----------------------------------------------
    read_model_kind = delegate(__package__, "kind", "read_model_kind")
    check_model_dir = delegate(__package__, "loading", "check_model_dir")
    check_weights_match_config = delegate(__package__, "loading", "check_weights_match_config")
    weights_signature = delegate(__package__, "loading", "weights_signature")
    load_components = delegate(__package__, "loading", "load_components")
    load_scheduler = delegate(__package__, "loading", "load_scheduler")
    read_lora = delegate(__package__, "loading", "read_lora")  # diffusers' format only (no 1.5 converter)
    encode_prompt = delegate(__package__, "text", "encode_prompt")
    vae_scale_factors = delegate(__package__, "vae", "vae_scale_factors")
    can_decode_ranges = delegate(__package__, "vae", "can_decode_ranges")
    iter_decode = delegate(__package__, "vae", "iter_decode")

    classifier_free = Family.classifier_free  # real CFG on sampling.guidance_scale, not HunyuanVideo's true CFG

    def check_sampling(self, cfg):
        s = cfg.sampling
        if s.true_cfg_scale != 1.0:
            return (f"sampling.true_cfg_scale={s.true_cfg_scale:g}: HunyuanVideo 1.5 runs real classifier-free "
                    "guidance on sampling.guidance_scale (no embedded guidance)")
        if s.guidance_scale < 1.0:  # the pipeline's guider runs CFG below 1 too; the engine's rule is > 1
            return (f"sampling.guidance_scale={s.guidance_scale:g}: below 1 is not supported for HunyuanVideo 1.5 "
                    "(1: no guidance; > 1: classifier-free guidance)")
        return self.refused_speedup(cfg) or self.not_built(cfg)

    # diffusers 0.42 registers no HunyuanVideo15TransformerBlock for the caches that skip blocks; the pipeline
    # fails the same way
    refused_caches = {name: "diffusers has no block registration of HunyuanVideo 1.5 for this cache"
                      for name in ("first_block", "mag", "sea")}

    def render_inputs(self, components, cfg, geometry, image, device, dtype):
        from ...images import load_image
        from .conditioning import build_conditioning

        if image is not None:
            raise ValueError("HunyuanVideo 1.5 takes its image through conditioning channels (cfg.image)")
        shown = load_image(cfg.image, "image") if cfg.image is not None else None
        condition = build_conditioning(components, shown, latent_shape=geometry.shape, height=cfg.video.height,
                                       width=cfg.video.width, device=device, dtype=dtype)
        return condition, None

    def owns_vae(self, vae):
        from diffusers import AutoencoderKLHunyuanVideo15

        return isinstance(vae, AutoencoderKLHunyuanVideo15)

    def owns(self, transformer) -> bool:
        from diffusers import HunyuanVideo15Transformer3DModel

        return isinstance(transformer, HunyuanVideo15Transformer3DModel)

    # -- a stock diffusers pipeline ---------------------------------------------------------------------------
    def pipeline_prompt_texts(self, encode_prompt_output):
        embeds, mask, embeds_2, mask_2 = encode_prompt_output  # one prompt a call: the negative is a second call
        return [{"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "encoder_hidden_states_2": embeds_2,
                 "encoder_attention_mask_2": mask_2}]
    # pipeline_uses_cfg: v1's rule (the guider encodes the negative prompt only when it runs an uncond pass)

    # -- the dry-run planner ---------------------------------------------------------------------------------
    vae_spatial = counts.VAE_SPATIAL
    counts = counts  # the inherited planner methods read this folder's counts

    image_encoder_params = delegate(__package__, "counts", "image_encoder_params")

    def conditioning_pixel_frames(self, config, frames):
        return 1 if counts.image_tokens(config) else 0  # the image alone (text-to-video's channels are zeros)

    def weight_blocks(self, transformer):
        return list(transformer.transformer_blocks)

    # -- attention surgery (the rest is HunyuanVideo's) -------------------------------------------------------
    def attention_layers(self, transformer):
        return [block.attn for block in transformer.transformer_blocks]

    def stock_processor(self):
        from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0

        return HunyuanVideo15AttnProcessor2_0()

    def joint_inputs(self, args, kwargs, num_video_tokens: int):
        """(text states [B, Lt, D], valid text keys Bool[B, Lt] or None): the 1.5 processor's mask is the text
        keys' own [B, Lt] (valid tokens first, as the transformer reorders them)."""
        bound = dict(zip(self._ARGS, args)) | kwargs
        text, mask = bound["encoder_hidden_states"], bound.get("attention_mask")
        valid = None if mask is None else mask.reshape(mask.shape[0], -1)[:, -text.shape[1]:].bool()
        return text, None if valid is None or bool(valid.all()) else valid
