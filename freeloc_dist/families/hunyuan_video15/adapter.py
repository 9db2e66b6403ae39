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

from ..hunyuan_video.adapter import HunyuanVideoFamily
from . import counts
from .kind import PIPELINES


class HunyuanVideo15Family(HunyuanVideoFamily):
    name = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    pipelines = PIPELINES
    text_encoder_fields = ("text_encoder", "text_encoder_2")  # Qwen and ByT5

    # -- model directories ---------------------------------------------------------------------------------
    def read_model_kind(self, model_dir):
        from .kind import read_model_kind

        return read_model_kind(model_dir, self.pipelines)

    def check_model_dir(self, model_dir):
        from .loading import check_model_dir

        return check_model_dir(model_dir)

    def check_weights_match_config(self, model_dir):
        from .loading import check_weights_match_config

        check_weights_match_config(model_dir)

    def weights_signature(self, model_dir):
        from .loading import weights_signature

        return weights_signature(model_dir)

    def load_components(self, model_dir, dtype, device, placement=None):
        from .loading import load_components

        return load_components(model_dir, dtype, device, placement)

    def load_scheduler(self, model_dir):
        from .loading import load_scheduler

        return load_scheduler(model_dir)

    # -- inputs and VAE ---------------------------------------------------------------------------------------
    def encode_prompt(self, components, prompt, max_tokens):
        from .text import encode_prompt

        return encode_prompt(components, prompt, max_tokens)

    def classifier_free(self, sampling):
        from ...guidance import uses_cfg

        return uses_cfg(sampling.guidance_scale), sampling.guidance_scale

    def check_sampling(self, cfg):
        s = cfg.sampling
        if s.true_cfg_scale != 1.0:
            return (f"sampling.true_cfg_scale={s.true_cfg_scale:g}: HunyuanVideo 1.5 runs real classifier-free "
                    "guidance on sampling.guidance_scale (no embedded guidance)")
        if s.guidance_scale < 1.0:  # the pipeline's guider runs CFG below 1 too; the engine's rule is > 1
            return (f"sampling.guidance_scale={s.guidance_scale:g}: below 1 is not supported for HunyuanVideo 1.5 "
                    "(1: no guidance; > 1: classifier-free guidance)")
        if s.guidance_scale_2 is not None:
            return "sampling.guidance_scale_2: HunyuanVideo 1.5 has one transformer (no second expert)"
        # Not built for this family yet: its text is a Hunyuan15Text (Qwen and ByT5 states with masks), which the
        # rank-0 broadcast does not carry; LoRAs are read with Wan's converters.
        if cfg.memory.text_encoder == "rank0":
            return "memory.text_encoder=rank0: not supported for HunyuanVideo 1.5 yet; use gpu or cpu"
        if cfg.memory.shard_weights:
            return "memory.shard_weights=true: not supported for HunyuanVideo 1.5 yet"
        if cfg.model.loras:
            return "model.loras: not supported for HunyuanVideo 1.5 yet (LoRAs are read with Wan's converters)"
        return None

    def render_inputs(self, components, cfg, geometry, image, device, dtype):
        from ...images import load_image
        from .conditioning import build_conditioning

        if image is not None:
            raise ValueError("HunyuanVideo 1.5 takes its image through conditioning channels (cfg.image)")
        shown = load_image(cfg.image, "image") if cfg.image is not None else None
        condition = build_conditioning(components, shown, latent_shape=geometry.shape, height=cfg.video.height,
                                       width=cfg.video.width, device=device, dtype=dtype)
        return condition, None

    def vae_scale_factors(self, vae):
        from .vae import vae_scale_factors

        return vae_scale_factors(vae)

    def owns_vae(self, vae):
        from diffusers import AutoencoderKLHunyuanVideo15

        return isinstance(vae, AutoencoderKLHunyuanVideo15)

    def can_decode_ranges(self, vae):
        from .vae import can_decode_ranges

        return can_decode_ranges(vae)

    def iter_decode(self, vae, latents, start=0, end=None):
        from .vae import iter_decode

        return iter_decode(vae, latents, start, end)

    def owns(self, transformer) -> bool:
        from diffusers import HunyuanVideo15Transformer3DModel

        return isinstance(transformer, HunyuanVideo15Transformer3DModel)

    # -- a stock diffusers pipeline: not built for this family yet --------------------------------------------
    def pipeline_prompt_embeds(self, encode_prompt_output):
        raise NotImplementedError("HunyuanVideo 1.5 pipelines: parallelize_pipeline is not supported yet")

    def pipeline_uses_cfg(self, pipe):
        raise NotImplementedError("HunyuanVideo 1.5 pipelines: parallelize_pipeline is not supported yet")

    # -- the dry-run planner ---------------------------------------------------------------------------------
    vae_spatial = counts.VAE_SPATIAL

    def known_transformers(self):
        return counts.KNOWN_TRANSFORMERS

    def known_kinds(self):
        return counts.KNOWN_KINDS

    def planner_config(self, config):
        return counts.planner_config(config)

    def transformer_params(self, config):
        return counts.transformer_params(config)

    def text_encoder_params(self, config):
        return counts.text_encoder_params(config)

    def image_encoder_params(self, config):
        return counts.SIGLIP_SO400M_PARAMS

    def weight_blocks(self, transformer):
        return list(transformer.transformer_blocks)

    def block_params(self, config):
        return counts.block_params(config)

    def linear_flops_per_pass(self, config, video_tokens, text_tokens, text_runs=1.0):
        return counts.linear_flops_per_pass(config, video_tokens, text_tokens)  # one text (no storyboards)

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
