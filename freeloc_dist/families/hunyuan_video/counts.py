"""HunyuanVideo's numbers for the dry-run planner (freeloc_dist.planner): the published transformer config (for
planning without the weights), the planner's view of it (60 profile layers: 20 dual- then 40 single-stream
blocks; the MLP width), parameter counts and the FLOPs of the linear layers and of the text's share of the joint
attention (text tokens join every block's attention, video first, text last).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping

from .kind import patch_of, profile_layers

MODEL_ID = "hunyuanvideo-community/HunyuanVideo"
# diffusers' HunyuanVideoTransformer3DModel config of the published model (its defaults, spelled out)
KNOWN_TRANSFORMERS: dict[str, dict[str, Any]] = {
    MODEL_ID: {"_class_name": "HunyuanVideoTransformer3DModel", "in_channels": 16, "out_channels": 16,
               "num_attention_heads": 24, "attention_head_dim": 128, "num_layers": 20, "num_single_layers": 40,
               "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2, "patch_size_t": 1,
               "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096,
               "pooled_projection_dim": 768, "rope_theta": 256.0, "rope_axes_dim": [16, 56, 56],
               "image_condition_type": None},
}
KNOWN_KINDS = {MODEL_ID: {"vae_spatial": 8}}
VAE_SPATIAL = 8
# The text encoders when text_encoder/config.json is absent: llava-llama-3-8b's LlamaModel (no LM head) and
# CLIP ViT-L/14's text tower.
LLAMA3_8B_BODY_PARAMS = 7.50e9
CLIP_L_TEXT_PARAMS = 1.23e8


def planner_config(t: Mapping[str, Any]) -> dict[str, Any]:
    """The transformer config as the planner reads every family's: num_layers counts profile layers (dual +
    single), ffn_dim is the MLP width, patch_size a [t, h, w] list. Idempotent (preflight hands it on read)."""
    if "num_dual_layers" in t:
        return dict(t)
    d = t["num_attention_heads"] * t["attention_head_dim"]
    return {**t, "_model_config": dict(t), "num_layers": profile_layers(t),
            "num_dual_layers": int(t.get("num_layers", 20)),
            "ffn_dim": int(d * float(t.get("mlp_ratio", 4.0))), "patch_size": list(patch_of(t)),
            "out_channels": t.get("out_channels") or t["in_channels"]}


@functools.lru_cache(maxsize=8)
def _meta_counts(config_json: str) -> tuple[int, tuple[int, ...]]:
    """(parameters of the model a config builds, parameters of each dual- then single-stream block), counted on
    the meta device (no memory, exact); one build serves both counts."""
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = HunyuanVideoTransformer3DModel(**config)
    blocks = [*model.transformer_blocks, *model.single_transformer_blocks]
    return sum(p.numel() for p in model.parameters()), tuple(sum(p.numel() for p in b.parameters()) for b in blocks)


def _counts_of(t: Mapping[str, Any]) -> tuple[int, tuple[int, ...]]:
    raw = t.get("_model_config", t)  # the diffusers config, under the planner's view of it
    return _meta_counts(json.dumps(raw, sort_keys=True))


def weight_block_params(t: Mapping[str, Any]) -> list[float]:
    """Parameters of each block memory.shard_weights shards (the adapter's weight_blocks: the dual-stream blocks,
    then the smaller single-stream ones; 339.8e6 and 141.6e6 each in the published model)."""
    return [float(n) for n in _counts_of(t)[1]]


MASK_BYTES = 8  # a text mask travels as the tokenizer made it: int64


def prompt_bytes(t: Mapping[str, Any], max_tokens: int, dtype_bytes: int) -> float:
    """One prompt's HunyuanText at most: Llama states and their mask over max_tokens, CLIP's pooled output."""
    c = t.get("_model_config", t)
    return float(max_tokens * (c["text_embed_dim"] * dtype_bytes + MASK_BYTES)
                 + c["pooled_projection_dim"] * dtype_bytes)


def transformer_params(t: Mapping[str, Any]) -> float:
    """Parameter count of a HunyuanVideoTransformer3DModel from its config (12.82e9 for the published one)."""
    return float(_counts_of(t)[0])


def text_encoder_params(te: Mapping[str, Any] | None) -> float:
    """The Llama text encoder (from its config: embeddings, attention with grouped k/v, gated MLP) plus CLIP's
    text tower, or the published pair's counts."""
    if not te:
        return LLAMA3_8B_BODY_PARAMS + CLIP_L_TEXT_PARAMS
    d, inter, layers = te["hidden_size"], te["intermediate_size"], te["num_hidden_layers"]
    heads = te["num_attention_heads"]
    kv = te.get("num_key_value_heads", heads) * (te.get("head_dim") or d // heads)
    layer = 2 * d * d + 2 * d * kv + 3 * d * inter + 2 * d
    return float(te["vocab_size"] * d + layers * layer + d) + CLIP_L_TEXT_PARAMS


def linear_flops_per_pass(t: Mapping[str, Any], video_tokens: int, text_tokens: int) -> float:
    """FLOPs of one transformer pass outside the video-video attention, for a rank holding `video_tokens` video
    tokens and the whole (replicated) text: every block's projections and MLPs over video and text tokens, and
    the attention scores that involve text (video queries x text keys, text queries x every video key and the
    text keys), 2 flops per multiply-add."""
    c = planner_config(t)
    d, mlp = c["num_attention_heads"] * c["attention_head_dim"], c["ffn_dim"]
    dual, single = c["num_dual_layers"], c["num_layers"] - c["num_dual_layers"]
    tokens = video_tokens + text_tokens
    per_dual = 4 * d * d + 2 * d * mlp  # q k v o + MLP (video and text streams each have their own weights)
    per_single = 3 * d * d + d * mlp + (d + mlp) * d  # q k v + MLP in + the fused output projection
    linear = 2.0 * tokens * (dual * per_dual + single * per_single)
    text_scores = 4.0 * d * text_tokens * (2 * video_tokens + text_tokens) * (dual + single)
    return linear + text_scores
