"""WanFamily: the adapter (families/base.py) for diffusers' WanTransformer3DModel.

FreeLOC replaces each block's self-attention `attn1` (cross-attention `attn2`, text and CLIP image tokens, is
never touched); q, k, v are computed exactly as diffusers' WanAttnProcessor does; RoPE is WanRotaryPosEmbed's
(families/wan/rope.py).
"""

from __future__ import annotations

from ..base import Family
from . import counts
from .kind import PIPELINES


class WanFamily(Family):
    name = "wan"
    transformer_classes = ("WanTransformer3DModel",)
    pipelines = PIPELINES

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

    # -- LoRAs --------------------------------------------------------------------------------------------
    def read_lora(self, path):
        from .loading import read_lora

        return read_lora(path)

    def transformer_shapes(self, model_dir, expert):
        from .loading import transformer_shapes

        return transformer_shapes(model_dir, expert)

    # -- inputs and VAE ---------------------------------------------------------------------------------------
    def encode_prompt(self, components, prompt, max_tokens):
        from .text import encode_prompt

        return encode_prompt(components.text_encoder, components.tokenizer, prompt, max_tokens)

    def vae_scale_factors(self, vae):
        from .vae import vae_scale_factors

        return vae_scale_factors(vae)

    def owns_vae(self, vae):
        from diffusers import AutoencoderKLWan

        return isinstance(vae, AutoencoderKLWan)

    def can_decode_ranges(self, vae):
        from .vae import can_decode_ranges

        return can_decode_ranges(vae)

    def iter_decode(self, vae, latents, start=0, end=None):
        from .vae import iter_decode

        return iter_decode(vae, latents, start, end)

    def render_inputs(self, components, cfg, geometry, image, device, dtype):
        from .conditioning import render_inputs

        return render_inputs(components, cfg, geometry, image, device, dtype)

    per_frame_text = True  # cross-attention is per token (families/wan/frame_text.py)

    def install_frame_text(self, transformer):
        from .frame_text import install

        return install(transformer)

    def owns(self, transformer) -> bool:
        from diffusers import WanTransformer3DModel

        return isinstance(transformer, WanTransformer3DModel)

    # -- attention surgery ------------------------------------------------------------------------------
    def attention_layers(self, transformer):
        return [block.attn1 for block in transformer.blocks]

    def stock_processor(self):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        return WanAttnProcessor()

    def freeloc_rotary(self, args, kwargs):
        # WanAttnProcessor(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb): self-attention
        # without a mask, with RoPE, is FreeLOC's; anything else (cross-attention) is the stock processor's.
        names = ("encoder_hidden_states", "attention_mask", "rotary_emb")
        bound = dict(zip(names, args)) | kwargs
        if bound.get("encoder_hidden_states") is not None or bound.get("attention_mask") is not None:
            return None
        return bound.get("rotary_emb")

    def project_qkv(self, attn, hidden_states):
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        return q, k, v.unflatten(2, (attn.heads, -1))

    def project_out(self, attn, out, dtype):
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3).to(dtype)))

    def grid_of(self, transformer, hidden_states):
        p_t, p_h, p_w = transformer.config.patch_size
        _, _, f, h, w = hidden_states.shape
        return f // p_t, h // p_h, w // p_w

    # -- a stock diffusers pipeline ---------------------------------------------------------------------------
    def pipeline_prompt_embeds(self, encode_prompt_output):
        return encode_prompt_output[0], encode_prompt_output[1]  # WanPipeline: (prompt_embeds, negative_embeds)

    def pipeline_uses_cfg(self, pipe):
        return bool(getattr(pipe, "do_classifier_free_guidance", False))

    # -- the dry-run planner ---------------------------------------------------------------------------------
    vae_spatial = counts.VAE_SPATIAL
    image_tokens = counts.IMAGE_TOKENS

    def known_transformers(self):
        return counts.KNOWN_TRANSFORMERS

    def known_kinds(self):
        return counts.KNOWN_KINDS

    def transformer_params(self, config):
        return counts.transformer_params(config)

    def weight_blocks(self, transformer):
        return list(transformer.blocks)

    def block_params(self, config):
        return counts.block_params(config)

    def linear_flops_per_pass(self, config, video_tokens, text_tokens, text_runs=1.0):
        return counts.linear_flops_per_pass(config, video_tokens, text_tokens, text_runs)

    def text_encoder_params(self, config):
        return counts.text_encoder_params(config)

    def image_encoder_params(self, config):
        return counts.image_encoder_params(config)

    # -- RoPE ---------------------------------------------------------------------------------------------
    def temporal_rope(self, transformer):
        from .rope import temporal_rope_of

        return temporal_rope_of(transformer)

    def rope_module(self, transformer):
        return transformer.rope

    def global_rope(self, transformer, num_frames, height, width):
        from .rope import global_rope

        return global_rope(transformer, num_frames, height, width)

    def grow_rope(self, transformer, num_frames):
        from .rope import grow_rope_tables

        return grow_rope_tables(transformer.rope, num_frames)

    def set_temporal_frequency(self, transformer, index, omega):
        from .rope import set_temporal_frequency

        return set_temporal_frequency(transformer, index, omega)
