"""Wan's numbers for the dry-run planner (freeloc_dist.planner): the published transformer configs, for
planning without the weights present, and parameter counts of the transformer, the UMT5 text encoder and
Wan2.1 I2V's CLIP image encoder from their configs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from .kind import CLIP_IMAGE_TOKENS

# The published diffusers transformer configs, for planning without the weights present.
KNOWN_TRANSFORMERS: dict[str, dict[str, Any]] = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": {"num_layers": 30, "num_attention_heads": 12, "attention_head_dim": 128,
                                         "ffn_dim": 8960, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                                         "freq_dim": 256, "patch_size": [1, 2, 2]},
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": {"num_layers": 40, "num_attention_heads": 40, "attention_head_dim": 128,
                                        "ffn_dim": 13824, "in_channels": 16, "out_channels": 16, "text_dim": 4096,
                                        "freq_dim": 256, "patch_size": [1, 2, 2]},
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers": {"num_layers": 30, "num_attention_heads": 24, "attention_head_dim": 128,
                                        "ffn_dim": 14336, "in_channels": 48, "out_channels": 48, "text_dim": 4096,
                                        "freq_dim": 256, "patch_size": [1, 2, 2]},
}
# Wan2.1-I2V-14B (480P and 720P share the transformer): 16 noise + 4 mask + 16 conditioning channels, CLIP
# image cross-attention (image_dim 1280 = ViT-H/14's width, added k/v projections at the model width)
KNOWN_TRANSFORMERS["Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"] = {
    **KNOWN_TRANSFORMERS["Wan-AI/Wan2.1-T2V-14B-Diffusers"], "in_channels": 36, "image_dim": 1280,
    "added_kv_proj_dim": 5120}
# What the planner needs of a published model's VAE and pipeline when its directory is not here (otherwise it
# is read from the directory: freeloc_dist.family.ModelKind).
KNOWN_KINDS = {"Wan-AI/Wan2.2-TI2V-5B-Diffusers": {"vae_spatial": 16, "expand_timesteps": True},
               "Wan-AI/Wan2.2-T2V-A14B-Diffusers": {"two_experts": True},
               "Wan-AI/Wan2.2-I2V-A14B-Diffusers": {"two_experts": True}}
# Wan2.2 A14B: two experts, each of Wan2.1-14B's shape (I2V: 16 noise + 4 mask + 16 conditioning channels, no CLIP)
KNOWN_TRANSFORMERS["Wan-AI/Wan2.2-T2V-A14B-Diffusers"] = dict(KNOWN_TRANSFORMERS["Wan-AI/Wan2.1-T2V-14B-Diffusers"])
KNOWN_TRANSFORMERS["Wan-AI/Wan2.2-I2V-A14B-Diffusers"] = {
    **KNOWN_TRANSFORMERS["Wan-AI/Wan2.1-T2V-14B-Diffusers"], "in_channels": 36}
UMT5_XXL_PARAMS = 5.68e9  # Wan's text encoder (encoder only), when text_encoder/config.json is absent
VAE_SPATIAL = 8


IMAGE_TOKENS = CLIP_IMAGE_TOKENS  # one image's CLIP tokens, when the model directory is not here
for _config in KNOWN_TRANSFORMERS.values():  # the class, as a config.json names it (the planner's family lookup)
    _config.setdefault("_class_name", "WanTransformer3DModel")


def block_params(t: Mapping[str, Any]) -> float:
    """Parameters of one WanTransformerBlock (biases and norms included)."""
    d, ffn = t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"]
    block = (4 * d * d + 4 * d + 2 * d) * 2 + d * 2  # self + cross attention (q k v o, qk norms), cross norm
    block += 2 * d * ffn + ffn + d + 6 * d  # FFN, modulation table
    if t.get("image_dim"):  # Wan2.1 I2V / FLF2V: image k/v projections (+ k norm) in every cross-attention
        block += 2 * ((t.get("added_kv_proj_dim") or d) * d + d) + d
    return block


def transformer_params(t: Mapping[str, Any]) -> float:
    """Parameter count of a WanTransformer3DModel from its config (biases and norms included)."""
    d = t["num_attention_heads"] * t["attention_head_dim"]
    layers = t["num_layers"]
    patch = math.prod(t.get("patch_size", [1, 2, 2]))
    block = block_params(t)
    rest = t["in_channels"] * patch * d + d  # patch embedding
    rest += t.get("text_dim", 4096) * d + d + d * d + d  # text embedder
    rest += t.get("freq_dim", 256) * d + d + d * d + d + d * 6 * d + 6 * d  # time embedder + projection
    rest += d * t["out_channels"] * patch + t["out_channels"] * patch + 2 * d  # head
    image_dim = t.get("image_dim")
    if image_dim:  # Wan2.1 I2V / FLF2V: the image embedder (the blocks' image projections: block_params)
        rest += 2 * image_dim + image_dim * image_dim + image_dim + image_dim * d + d + 2 * d
        rest += (t.get("pos_embed_seq_len") or 0) * image_dim
    return layers * block + rest


CLIP_VIT_H14 = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "image_size": 224,
                "patch_size": 14, "num_channels": 3}  # Wan2.1 I2V's image encoder, when its config is absent


def image_encoder_params(clip: Mapping[str, Any] | None) -> float:
    """Parameter count of a transformers CLIPVisionModel from its config (Wan2.1 I2V's image encoder)."""
    c = {**CLIP_VIT_H14, **(clip or {})}
    h, inner, layers, patch = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["patch_size"]
    positions = (c["image_size"] // patch) ** 2 + 1
    embeddings = c.get("num_channels", 3) * patch * patch * h + h + positions * h  # patch conv, class, positions
    layer = 4 * (h * h + h) + 2 * (h * inner) + inner + h + 4 * h  # attention, MLP, two layer norms
    return embeddings + layers * layer + 4 * h  # + pre and post layer norms


def linear_flops_per_pass(t: Mapping[str, Any], video_tokens: int, text_tokens: int, text_runs: float = 1.0) -> float:
    """Linear layers per pass: self q k v o (4 d^2), cross q o (2 d^2), FFN (2 d ffn) per video token; cross k v per
    text token of `text_runs` texts (a storyboard's runs of frames; 1: one prompt); 2 flops per multiply-add.
    Cross-attention scores: 4 x tokens x text tokens x d."""
    d, ffn = t["num_attention_heads"] * t["attention_head_dim"], t["ffn_dim"]
    return t["num_layers"] * (2.0 * video_tokens * (6 * d * d + 2 * d * ffn) + 2.0 * text_tokens * 2 * d * d * text_runs
                              + 4.0 * video_tokens * text_tokens * d)


def text_encoder_params(te: Mapping[str, Any] | None) -> float:
    if not te:
        return UMT5_XXL_PARAMS
    d, ff, layers = te["d_model"], te["d_ff"], te["num_layers"]
    inner = te.get("num_heads", 1) * te.get("d_kv", d // max(1, te.get("num_heads", 1)))
    return te["vocab_size"] * d + layers * (4 * d * inner + 3 * d * ff + 2 * d) + d
