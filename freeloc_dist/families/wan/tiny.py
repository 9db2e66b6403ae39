"""A tiny random Wan2.1 text-to-video model, built offline, for tests and the embedded default config.

Same classes and layout as the real Wan2.1-T2V-Diffusers checkpoints, only small: a 3-layer
WanTransformer3DModel (2 heads x head_dim 12, so Wan's RoPE split is t/h/w = 4/4/4), an AutoencoderKLWan
with 4 latent channels and the real 4x temporal / 8x spatial compression, a 2-layer UMT5 encoder, a byte-level
tokenizer built with the `tokenizers` library (no vocabulary download), and Wan's UniPC flow-matching
scheduler. `save_tiny_model` writes it in diffusers format (assets/tiny-wan/ is made this way, by
launch/make_tiny.py), and it is loaded back through freeloc_dist.models like any real checkpoint.
Weights depend only on `seed`. The outputs are noise, but every code path of a real render runs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from freeloc_dist.models import Components

from .loading import save_components

TINY_TEXT_DIM = 32
TINY_Z_DIM = 4
TINY_NUM_LAYERS = 3
TINY_TRAINED_FRAMES = 5  # declared, not trained: the tiny profile's T (configs/profiles/tiny-random.yaml)

_SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]  # ids 0, 1, 2 as in T5/UMT5


def build_tiny_tokenizer():
    """A byte-level tokenizer: one token per UTF-8 byte, plus pad/eos/unk; appends </s> like UMT5's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_SPECIAL_TOKENS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def build_tiny_components(seed: int = 0) -> Components:
    """Build the tiny model in memory (float32, CPU, eval mode). Deterministic for a seed."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tiny_tokenizer()
    # Module constructors draw their initial weights from the global RNG; fork it so building the tiny
    # model neither depends on nor disturbs the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,  # RoPE split t/h/w = 12 - 2*4 / 4 / 4
            in_channels=TINY_Z_DIM,
            out_channels=TINY_Z_DIM,
            text_dim=TINY_TEXT_DIM,
            freq_dim=32,
            ffn_dim=48,
            num_layers=TINY_NUM_LAYERS,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
        )
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=TINY_Z_DIM,
            dim_mult=[1, 2, 2, 2],  # three downsamples: 8x spatial
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],  # two temporal downsamples: 4x
            # non-trivial statistics so that decode's un-normalisation is exercised
            latents_mean=[0.1, -0.2, 0.05, 0.0],
            latents_std=[1.5, 0.8, 1.2, 1.0],
        )
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        ))
    # Wan2.1's own scheduler settings (flow sigmas, flow prediction, shift 3.0).
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
    )
    return Components(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        trained_frames=TINY_TRAINED_FRAMES,
    )


def save_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to `out_dir` in diffusers format (loadable by freeloc_dist.models)."""
    return save_components(build_tiny_components(seed), out_dir)


TINY_BOUNDARY_RATIO = 0.875  # Wan2.2-T2V-A14B's


def build_tiny_a14b_components(seed: int = 0) -> Components:
    """The tiny model with Wan2.2-T2V-A14B's structure: a second (low-noise) expert of the same shape with its
    own weights, and the boundary ratio in model_index.json."""
    import dataclasses

    parts = build_tiny_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 3)
        second = type(parts.transformer)(**parts.transformer.config)
    return dataclasses.replace(parts, transformer_2=second.eval(), boundary_ratio=TINY_BOUNDARY_RATIO)


def save_tiny_a14b_model(out_dir: str | Path, seed: int = 0) -> Path:
    return save_components(build_tiny_a14b_components(seed), out_dir)


TINY_CLIP_DIM = 16
TINY_CLIP_IMAGE = 28  # CLIP input size: (28 / 14)^2 = 4 patches + the class token = 5 image tokens
TINY_I2V_BOUNDARY_RATIO = 0.9  # Wan2.2-I2V-A14B's


def build_tiny_clip(seed: int = 0):
    """A 2-layer CLIPVisionModel (Wan2.1 I2V reads its penultimate layer) and its CLIPImageProcessor, with the
    real OpenAI CLIP normalisation and resize-then-centre-crop, at 28 x 28 instead of 224 x 224."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from .loading import clip_image_processor_class

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=TINY_CLIP_DIM, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            image_size=TINY_CLIP_IMAGE, patch_size=14, projection_dim=TINY_CLIP_DIM))
    processor = clip_image_processor_class()(size={"shortest_edge": TINY_CLIP_IMAGE},
                                   crop_size={"height": TINY_CLIP_IMAGE, "width": TINY_CLIP_IMAGE})
    return encoder.eval(), processor


def _i2v_transformer(config: dict, seed: int, *, clip: bool, images: int = 1):
    """The tiny transformer with Wan I2V's input (noise + 4 mask + conditioning channels) and, with `clip`,
    Wan2.1's image cross-attention (image_dim, added_kv_proj_dim = the model width, as in the real config;
    `images` 2: FLF2V's position embedding over both images' tokens)."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(in_channels=2 * TINY_Z_DIM + 4, out_channels=TINY_Z_DIM)
    if clip:
        tokens = (TINY_CLIP_IMAGE // 14) ** 2 + 1
        config.update(image_dim=TINY_CLIP_DIM,
                      added_kv_proj_dim=config["num_attention_heads"] * config["attention_head_dim"],
                      pos_embed_seq_len=images * tokens if images == 2 else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(**config).eval()


def build_tiny_i2v_components(seed: int = 0, *, last_frame: bool = False) -> Components:
    """Wan2.1-I2V-14B's structure, tiny: a 12-channel-input transformer with CLIP image cross-attention, a
    CLIP vision encoder and its image processor (`last_frame`: Wan2.1-FLF2V's two-image variant)."""
    import dataclasses

    parts = build_tiny_components(seed)
    transformer = _i2v_transformer(dict(parts.transformer.config), seed + 4, clip=True, images=2 if last_frame else 1)
    encoder, processor = build_tiny_clip(seed + 5)
    return dataclasses.replace(parts, transformer=transformer, image_encoder=encoder, image_processor=processor)


def build_tiny_i2v_a14b_components(seed: int = 0) -> Components:
    """Wan2.2-I2V-A14B's structure, tiny: two 12-channel-input experts, no CLIP, boundary ratio 0.9."""
    import dataclasses

    parts = build_tiny_components(seed)
    config = dict(parts.transformer.config)
    return dataclasses.replace(parts, transformer=_i2v_transformer(config, seed + 4, clip=False),
                               transformer_2=_i2v_transformer(config, seed + 6, clip=False),
                               boundary_ratio=TINY_I2V_BOUNDARY_RATIO)


def save_tiny_i2v_model(out_dir: str | Path, seed: int = 0) -> Path:
    return save_components(build_tiny_i2v_components(seed), out_dir)


def save_tiny_i2v_a14b_model(out_dir: str | Path, seed: int = 0) -> Path:
    return save_components(build_tiny_i2v_a14b_components(seed), out_dir)


def save_tiny_flf2v_model(out_dir: str | Path, seed: int = 0) -> Path:
    return save_components(build_tiny_i2v_components(seed, last_frame=True), out_dir)


TINY_TI2V_Z_DIM = 48  # Wan2.2's VAE: 48 latent channels (the real z_dim; everything else is reduced)
TINY_TI2V_FLOW_SHIFT = 5.0  # Wan2.2-TI2V-5B's scheduler


def build_tiny_ti2v_components(seed: int = 0) -> Components:
    """A tiny model with Wan2.2-TI2V-5B's structure: one transformer over the 48 latent channels (no mask or
    conditioning channels), the Wan2.2 residual VAE (z_dim 48, patch_size 2 inside the VAE, 16x spatial =
    8x from three upsamplings x the 2x patch, 4x temporal, 48 per-channel statistics) and expand_timesteps
    (per-token timesteps) in model_index.json. Text encoder and tokenizer are the tiny model's."""
    import dataclasses

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel

    parts = build_tiny_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 4)
        transformer = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=TINY_TI2V_Z_DIM,
            out_channels=TINY_TI2V_Z_DIM, text_dim=TINY_TEXT_DIM, freq_dim=32, ffn_dim=48,
            num_layers=TINY_NUM_LAYERS, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        )
        torch.manual_seed(seed + 5)
        gen = torch.Generator().manual_seed(seed + 6)
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=TINY_TI2V_Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
            attn_scales=[], temperal_downsample=[False, True, True], is_residual=True,
            in_channels=12, out_channels=12,  # 3 colours x the 2 x 2 patch
            patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
            # non-trivial statistics so that the normalisation of every one of the 48 channels is exercised
            latents_mean=(torch.randn(TINY_TI2V_Z_DIM, generator=gen) * 0.2).tolist(),
            latents_std=(0.5 + torch.rand(TINY_TI2V_Z_DIM, generator=gen)).tolist(),
        )
    scheduler = UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                        use_flow_sigmas=True, flow_shift=TINY_TI2V_FLOW_SHIFT, solver_order=2)
    return dataclasses.replace(parts, transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler,
                               expand_timesteps=True)


def save_tiny_ti2v_model(out_dir: str | Path, seed: int = 0) -> Path:
    return save_components(build_tiny_ti2v_components(seed), out_dir)
