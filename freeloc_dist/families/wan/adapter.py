"""WanFamily: the adapter (families/base.py) for diffusers' WanTransformer3DModel.

FreeLOC replaces each block's self-attention `attn1` (cross-attention `attn2`, text and CLIP image tokens, is
never touched); q, k, v are computed exactly as diffusers' WanAttnProcessor does; RoPE is WanRotaryPosEmbed's
(families/wan/rope.py).
"""

from __future__ import annotations

from ..base import Family, delegate
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

    check_model_dir = delegate(__package__, "loading", "check_model_dir")
    check_weights_match_config = delegate(__package__, "loading", "check_weights_match_config")
    weights_signature = delegate(__package__, "loading", "weights_signature")
    load_components = delegate(__package__, "loading", "load_components")
    load_scheduler = delegate(__package__, "loading", "load_scheduler")

    # -- LoRAs --------------------------------------------------------------------------------------------
    read_lora = delegate(__package__, "loading", "read_lora")

    # -- inputs and VAE ---------------------------------------------------------------------------------------
    def encode_prompt(self, components, prompt, max_tokens):
        from .text import encode_prompt

        return encode_prompt(components.text_encoder, components.tokenizer, prompt, max_tokens)

    vae_scale_factors = delegate(__package__, "vae", "vae_scale_factors")

    def owns_vae(self, vae):
        from diffusers import AutoencoderKLWan

        return isinstance(vae, AutoencoderKLWan)

    can_decode_ranges = delegate(__package__, "vae", "can_decode_ranges")
    iter_decode = delegate(__package__, "vae", "iter_decode")
    render_inputs = delegate(__package__, "conditioning", "render_inputs")

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
    def pipeline_prompt_texts(self, encode_prompt_output):
        positive, negative = encode_prompt_output  # WanPipeline: (prompt_embeds, negative_prompt_embeds or None)
        return [{"encoder_hidden_states": e} for e in (positive, negative) if e is not None]

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

    def weight_block_params(self, config):
        return [counts.block_params(config)] * config["num_layers"]  # every block alike

    def linear_flops_per_pass(self, config, video_tokens, text_tokens, text_runs=1.0):
        return counts.linear_flops_per_pass(config, video_tokens, text_tokens, text_runs)

    def text_encoder_params(self, config):
        return counts.text_encoder_params(config)

    def image_encoder_params(self, transformer_config, config):
        # image cross-attention (Wan2.1 I2V, FLF2V) comes with CLIP; Wan2.2's image modes have no image encoder
        return counts.image_encoder_params(config) if transformer_config.get("image_dim") else 0.0

    # -- RoPE ---------------------------------------------------------------------------------------------
    def temporal_rope(self, transformer):
        from .rope import temporal_rope_of

        return temporal_rope_of(transformer)

    def rope_module(self, transformer):
        return transformer.rope

    global_rope = delegate(__package__, "rope", "global_rope")

    def grow_rope(self, transformer, num_frames):
        from .rope import grow_rope_tables

        return grow_rope_tables(transformer.rope, num_frames)

    set_temporal_frequency = delegate(__package__, "rope", "set_temporal_frequency")
