"""HunyuanVideo 1.5's numbers for the dry-run planner (freeloc_dist.planner): the published transformer config
(for planning without the weights), the planner's view of it (54 profile layers, one per dual-stream block; the
MLP width), parameter counts, and the FLOPs of the linear layers and of the text's share of the joint attention
(text tokens join every block's attention, video first, text last).

Text tokens per pass: the prompt's Qwen tokens (sampling.max_text_tokens at most; padding is dropped), the ByT5
glyph tokens (none without quoted text: not counted) and, for image-to-video, SigLIP's 729 image tokens.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping

from ..hunyuan_video.counts import MASK_BYTES
from .kind import TRAINED_FRAMES, patch_of

T2V_ID = "hunyuanvideo-community/HunyuanVideo-1.5-480p_t2v"
I2V_ID = "hunyuanvideo-community/HunyuanVideo-1.5-480p_i2v"
# diffusers' HunyuanVideo15Transformer3DModel defaults, which are the published 480p models' (task_type aside)
_PUBLISHED = {"_class_name": "HunyuanVideo15Transformer3DModel", "in_channels": 65, "out_channels": 32,
              "num_attention_heads": 16, "attention_head_dim": 128, "num_layers": 54, "num_refiner_layers": 2,
              "mlp_ratio": 4.0, "patch_size": 1, "patch_size_t": 1, "qk_norm": "rms_norm", "text_embed_dim": 3584,
              "text_embed_2_dim": 1472, "image_embed_dim": 1152, "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56],
              "target_size": 640, "use_meanflow": False}
KNOWN_TRANSFORMERS: dict[str, dict[str, Any]] = {T2V_ID: {**_PUBLISHED, "task_type": "t2v"},
                                                 I2V_ID: {**_PUBLISHED, "task_type": "i2v"}}
VAE_SPATIAL = 16
KNOWN_KINDS = {model: {"vae_spatial": VAE_SPATIAL, "trained_frames": TRAINED_FRAMES} for model in (T2V_ID, I2V_ID)}
SIGLIP_TOKENS = 729  # SigLIP so400m at 384 px, patch 14: 27 x 27 (the pipeline's vision_num_semantic_tokens)
# The text encoders when text_encoder/config.json is absent: Qwen2.5-VL-7B's language model (no LM head; 3584
# wide, 28 layers, MLP 18944, 4 k/v heads, vocabulary 152064) and ByT5-small's encoder (the glyph text).
QWEN25_VL_7B_TEXT_PARAMS = 7.07e9
BYT5_SMALL_ENCODER_PARAMS = 2.18e8
# SigLIP so400m at 384 px, patch 14 (1152 wide, 27 layers, MLP 4304, with its pooling head): SiglipVisionModel
SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 384, "patch_size": 14}


def planner_config(t: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer config as the planner reads every family's: num_layers counts profile layers (the
    dual-stream blocks), ffn_dim is the MLP width, patch_size a [t, h, w] list. Idempotent."""
    if "_model_config" in t:
        return dict(t)
    d = t["num_attention_heads"] * t["attention_head_dim"]
    return {**t, "_model_config": dict(t), "num_layers": int(t.get("num_layers", 54)),
            "ffn_dim": int(d * float(t.get("mlp_ratio", 4.0))), "patch_size": list(patch_of(t)),
            "out_channels": t.get("out_channels") or t["in_channels"]}


@functools.lru_cache(maxsize=8)
def _meta_counts(config_json: str) -> tuple[int, tuple[int, ...]]:
    """(parameters of the model a config builds, parameters of each dual-stream block), on the meta device."""
    import torch
    from diffusers import HunyuanVideo15Transformer3DModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = HunyuanVideo15Transformer3DModel(**config)
    blocks = tuple(sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks)
    return sum(p.numel() for p in model.parameters()), blocks


def _counts_of(t: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    return _meta_counts(json.dumps(t.get("_model_config", t), sort_keys=True))


def transformer_params(t: Mapping[str, Any]) -> float:
    """Parameter count of a HunyuanVideo15Transformer3DModel from its config (8.33e9 for the published one)."""
    return float(_counts_of(t)[0])


def weight_block_params(t: Mapping[str, Any]) -> list[float]:
    """Parameters of each block memory.shard_weights shards (the dual-stream blocks, all alike)."""
    return [float(n) for n in _counts_of(t)[1]]


def prompt_bytes(t: Mapping[str, Any], max_tokens: int, dtype_bytes: int) -> float:
    """One prompt's Hunyuan15Text at most: Qwen states and mask over max_tokens, ByT5 states and mask over its
    256 tokens (masks int64, as the tokenizers make them)."""
    from .text import BYT5_TOKENS

    c = t.get("_model_config", t)
    return float(max_tokens * (c["text_embed_dim"] * dtype_bytes + MASK_BYTES)
                 + BYT5_TOKENS * (c["text_embed_2_dim"] * dtype_bytes + MASK_BYTES))


def text_encoder_params(te: Mapping[str, Any] | None) -> float:
    """Qwen's language model (from its config: embeddings, attention with grouped k/v and q/k/v biases, gated
    MLP) plus ByT5's encoder, or the published pair's counts."""
    if not te:
        return QWEN25_VL_7B_TEXT_PARAMS + BYT5_SMALL_ENCODER_PARAMS
    d, inter, layers = te["hidden_size"], te["intermediate_size"], te["num_hidden_layers"]
    heads = te["num_attention_heads"]
    kv = te.get("num_key_value_heads", heads) * (te.get("head_dim") or d // heads)
    layer = 2 * d * d + 2 * d * kv + d + 2 * kv + 3 * d * inter + 2 * d
    return float(te["vocab_size"] * d + layers * layer + d) + BYT5_SMALL_ENCODER_PARAMS


def image_tokens(t: Mapping[str, Any]) -> int:
    """Image tokens joining the text: SigLIP's for an image-to-video transformer, none for text-to-video."""
    return SIGLIP_TOKENS if t.get("task_type", "i2v") == "i2v" else 0


@functools.lru_cache(maxsize=8)
def _siglip_params(config_json: str) -> float:
    import torch
    from transformers import SiglipVisionConfig, SiglipVisionModel

    with torch.device("meta"):
        model = SiglipVisionModel(SiglipVisionConfig.from_dict(json.loads(config_json)))
    return float(sum(p.numel() for p in model.parameters()))


def image_encoder_params(t: Mapping[str, Any], siglip: Mapping[str, Any] | None) -> float:
    """SigLIP's parameters for an image-to-video transformer (built from image_encoder/config.json on the meta
    device, or SigLIP so400m's count), none for text-to-video."""
    if not image_tokens(t):
        return 0.0
    return _siglip_params(json.dumps(dict(siglip or SIGLIP_SO400M), sort_keys=True))


def linear_flops_per_pass(t: Mapping[str, Any], video_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer pass outside the video-video attention, for a rank holding `video_tokens` video
    tokens and the whole (replicated) text (+ image tokens): every dual-stream block's projections and MLPs over
    video and text tokens, and the attention scores that involve text (video queries x text keys, text queries x
    every video key and the text keys), 2 flops per multiply-add."""
    c = planner_config(t)
    d, mlp, layers = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"], c["num_layers"]
    text = text_tokens + image_tokens(c)
    linear = 2.0 * (video_tokens + text) * layers * (4 * d * d + 2 * d * mlp)  # q k v o + MLP, each stream's own
    text_scores = 4.0 * d * text * (2 * video_tokens + text) * layers
    return linear + text_scores
