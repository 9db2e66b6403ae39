"""HunyuanVideoFamily: the adapter (families/base.py) for diffusers' HunyuanVideoTransformer3DModel (text-to-video).

FreeLOC replaces the joint attention of every dual-stream block, then of every single-stream block (that order is
the profile's layer index: 20 + 40 = 60 layers); the token refiner's text-only attention is never touched. Text
joins the video inside these attentions (video first, text last; DESIGN 11): dual-stream blocks project text with
their own `add_*_proj` and `to_add_out`, single-stream blocks with the video's projections and no output
projection (`pre_only`). q, k, v are computed as diffusers' HunyuanVideoAttnProcessor2_0 does; only video tokens
get RoPE. Guidance is embedded (the `guidance` input, scale x 1000); true classifier-free guidance runs only with
sampling.true_cfg_scale > 1, as in HunyuanVideoPipeline.
"""

from __future__ import annotations

from ..base import Family, delegate
from . import counts
from .kind import PIPELINES


class HunyuanVideoFamily(Family):
    name = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    pipelines = PIPELINES
    joint_text = True  # text tokens join the video tokens in FreeLOC's attention layers

    # -- model directories ---------------------------------------------------------------------------------
    def read_model_kind(self, model_dir):
        from .kind import read_model_kind

        return read_model_kind(model_dir, self.pipelines)

    text_encoder_fields = ("text_encoder", "text_encoder_2")  # Llama and CLIP (memory.text_encoder places both)

    check_model_dir = delegate(__package__, "loading", "check_model_dir")
    check_weights_match_config = delegate(__package__, "loading", "check_weights_match_config")
    weights_signature = delegate(__package__, "loading", "weights_signature")
    load_components = delegate(__package__, "loading", "load_components")
    load_scheduler = delegate(__package__, "loading", "load_scheduler")
    read_lora = delegate(__package__, "loading", "read_lora")  # diffusers' HunyuanVideo LoRA formats

    # -- inputs and VAE ---------------------------------------------------------------------------------------
    encode_prompt = delegate(__package__, "text", "encode_prompt")

    def sampling_sigmas(self, steps):
        import numpy as np

        return np.linspace(1.0, 0.0, steps + 1)[:-1]  # HunyuanVideoPipeline's

    def text_kwargs(self, text):
        return text.transformer_kwargs()

    def classifier_free(self, sampling):
        scale = sampling.true_cfg_scale
        return scale > 1.0, scale

    def check_sampling(self, cfg):
        s = cfg.sampling
        if cfg.parallel.cfg_degree == 2 and s.true_cfg_scale <= 1.0:
            return ("parallel.cfg_degree=2: HunyuanVideo embeds its guidance (sampling.guidance_scale) and runs no "
                    "unconditional pass unless sampling.true_cfg_scale > 1")
        return self.refused_speedup(cfg) or self.not_built(cfg)

    # sampling.scheduler choices and caches (`cache.name`) a render of this family cannot run as diffusers' own
    # pipeline does, and why (tests/test_hunyuan_fast_sampling.py runs the others against the pipelines)
    refused_schedulers = {"dpm++": "DPMSolverMultistepScheduler takes no custom sigmas, which HunyuanVideo's "
                                   "sampling passes (the diffusers pipeline refuses it too)"}
    refused_caches: dict = {}

    def refused_speedup(self, cfg):
        """A scheduler or cache of the render this family refuses, as one line (None: nothing)."""
        s, name = cfg.sampling, (cfg.cache or {}).get("name")
        if s.scheduler in self.refused_schedulers:
            from ...choices import SCHEDULER_CHOICES

            others = ", ".join(c for c in SCHEDULER_CHOICES if c not in self.refused_schedulers)
            return (f"sampling.scheduler={s.scheduler}: not for {self.title}: {self.refused_schedulers[s.scheduler]}; "
                    f"use one of: {others}")
        if name in self.refused_caches:
            return f"cache.name={name}: not for {self.title}: {self.refused_caches[name]}"
        if name == "pyramid_attention_broadcast" and self.classifier_free(s)[0]:
            # diffusers' pipelines pad both texts to one length and the cache hands one pass's attention output
            # to the other; the render drops padded text, so the two passes' outputs differ in length
            return (f"cache.name={name}: not with {self.title}'s classifier-free guidance (the cache shares "
                    "attention outputs between the conditional and unconditional passes, whose texts differ in "
                    "length here); use it with one pass, or another cache")
        return None

    title = "HunyuanVideo"  # the model's name in refusals

    def not_built(self, cfg):
        """Settings these one-transformer families refuse (HunyuanVideo 1.5's too)."""
        if cfg.sampling.guidance_scale_2 is not None:
            return f"sampling.guidance_scale_2: {self.title} has one transformer (no second expert)"
        if cfg.model.compile == "blocks" and cfg.profile is not None:  # fullgraph: dynamo fails on the processor
            return (f"model.compile=blocks: not built for {self.title} with a FreeLOC profile yet (torch.compile's "
                    "full graph cannot trace its joint attention processor); use model.compile: full or none")
        return None

    def render_inputs(self, components, cfg, geometry, image, device, dtype):
        from .conditioning import EmbeddedGuidance

        if image is not None:
            raise ValueError("HunyuanVideo text-to-video takes no image")
        return EmbeddedGuidance(cfg.sampling.guidance_scale, device, dtype), None

    vae_scale_factors = delegate(__package__, "vae", "vae_scale_factors")

    def latent_channels(self, vae):
        return int(vae.config.latent_channels)

    def patch_size(self, transformer):
        c = transformer.config
        return c.patch_size_t, c.patch_size, c.patch_size

    def owns_vae(self, vae):
        from diffusers import AutoencoderKLHunyuanVideo

        return isinstance(vae, AutoencoderKLHunyuanVideo)

    can_decode_ranges = delegate(__package__, "vae", "can_decode_ranges")
    iter_decode = delegate(__package__, "vae", "iter_decode")

    def owns(self, transformer) -> bool:
        from diffusers import HunyuanVideoTransformer3DModel

        return isinstance(transformer, HunyuanVideoTransformer3DModel)

    # -- a stock diffusers pipeline ---------------------------------------------------------------------------
    def pipeline_prompt_texts(self, encode_prompt_output):
        embeds, pooled, mask = encode_prompt_output  # one prompt a call: the negative is a second call
        return [{"encoder_hidden_states": embeds, "encoder_attention_mask": mask, "pooled_projections": pooled}]

    def pipeline_uses_cfg(self, pipe):
        # true CFG is decided inside __call__ (true_cfg_scale > 1 and a negative prompt), which encodes the
        # negative prompt only then: a captured negative is the sign (pipeline._PromptCapture)
        return True

    # -- the dry-run planner ---------------------------------------------------------------------------------
    vae_spatial = counts.VAE_SPATIAL
    counts = counts  # the planner's numbers (HunyuanVideo 1.5 names its own module here)

    def known_transformers(self):
        return self.counts.KNOWN_TRANSFORMERS

    def known_kinds(self):
        return self.counts.KNOWN_KINDS

    def planner_config(self, config):
        return self.counts.planner_config(config)

    def transformer_params(self, config):
        return self.counts.transformer_params(config)

    def text_encoder_params(self, config):
        return self.counts.text_encoder_params(config)

    def image_encoder_params(self, transformer_config, config):
        return 0.0

    def weight_blocks(self, transformer):
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def weight_block_params(self, config):
        return self.counts.weight_block_params(config)

    def prompt_bytes(self, config, max_tokens, dtype_bytes):
        return self.counts.prompt_bytes(config, max_tokens, dtype_bytes)

    def linear_flops_per_pass(self, config, video_tokens, text_tokens, text_runs=1.0):
        return self.counts.linear_flops_per_pass(config, video_tokens, text_tokens)  # one text (no storyboards)

    # -- attention surgery ------------------------------------------------------------------------------
    def attention_layers(self, transformer):
        return ([block.attn for block in transformer.transformer_blocks]
                + [block.attn for block in transformer.single_transformer_blocks])

    def stock_processor(self):
        from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0

        return HunyuanVideoAttnProcessor2_0()

    _ARGS = ("encoder_hidden_states", "attention_mask", "image_rotary_emb")

    def freeloc_rotary(self, args, kwargs):
        # HunyuanVideoAttnProcessor2_0(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        # the joint call (text and RoPE) is FreeLOC's; the module's tables are [L, d], the engine's layout [1, L, 1, d]
        bound = dict(zip(self._ARGS, args)) | kwargs
        rotary = bound.get("image_rotary_emb")
        if rotary is None or bound.get("encoder_hidden_states") is None:
            return None
        cos, sin = rotary
        return (cos[None, :, None, :], sin[None, :, None, :]) if cos.ndim == 2 else (cos, sin)

    def joint_inputs(self, args, kwargs, num_video_tokens: int):
        """(text states [B, Lt, D], valid text keys Bool[B, Lt] or None) of a joint call."""
        bound = dict(zip(self._ARGS, args)) | kwargs
        text, mask = bound["encoder_hidden_states"], bound.get("attention_mask")
        valid = None
        if mask is not None:  # the transformer's key mask [B, 1, 1, Lv + Lt]
            valid = mask.reshape(mask.shape[0], -1)[:, num_video_tokens:].bool()
            valid = None if bool(valid.all()) else valid
        return text, valid

    def project_qkv(self, attn, hidden_states):
        q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q = attn.norm_q(q) if attn.norm_q is not None else q
        k = attn.norm_k(k) if attn.norm_k is not None else k
        return q, k, v

    def project_text_qkv(self, attn, text):
        if attn.add_q_proj is None:  # single-stream: text goes through the video's projections
            return self.project_qkv(attn, text)
        q, k, v = (p(text).unflatten(2, (attn.heads, -1)) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        q = attn.norm_added_q(q) if attn.norm_added_q is not None else q
        k = attn.norm_added_k(k) if attn.norm_added_k is not None else k
        return q, k, v

    def project_out(self, attn, out, dtype):
        out = out.flatten(2, 3).to(dtype)
        return attn.to_out[1](attn.to_out[0](out)) if getattr(attn, "to_out", None) is not None else out

    def project_joint_out(self, attn, out_video, out_text, dtype):
        text = out_text.flatten(2, 3).to(dtype)
        if getattr(attn, "to_add_out", None) is not None:
            text = attn.to_add_out(text)
        return self.project_out(attn, out_video, dtype), text

    def grid_of(self, transformer, hidden_states):
        p_t, p_h, p_w = self.patch_size(transformer)
        _, _, f, h, w = hidden_states.shape
        return f // p_t, h // p_h, w // p_w

    # -- RoPE ---------------------------------------------------------------------------------------------
    def temporal_rope(self, transformer):
        from .rope import temporal_rope_of

        return temporal_rope_of(transformer)

    def rope_module(self, transformer):
        return transformer.rope

    global_rope = delegate(__package__, "rope", "global_rope")

    def grow_rope(self, transformer, num_frames):
        return False  # HunyuanVideoRotaryPosEmbed computes its tables per forward, for any length

    def set_temporal_frequency(self, transformer, index, omega):
        raise ValueError("RIFLEx edits precomputed RoPE tables; HunyuanVideo computes them per forward "
                         "(not supported for this family)")
