"""HunyuanVideo 1.5's text conditioning, computed by diffusers' HunyuanVideo15Pipeline's own prompt functions (its
static `_get_mllm_prompt_embeds` and `_get_byt5_prompt_embeds`, with the pipeline's system message and crop): Qwen
2.5-VL's third-to-last hidden state of the prompt in its chat template (the template's first 108 tokens
cropped), and ByT5's states of the prompt's quoted glyph text (none: no tokens).

Padded tokens of both are dropped here, before the blocks: the transformer masks padded keys everywhere and
moves valid tokens first, and its token refiner pools over valid tokens only, so the video output is the same
(DESIGN 11), and the joint attention sees valid text only. Text-to-video's 729 image slots, which the pipeline
passes as zeros and masks, are likewise left out (conditioning.py passes no image tokens).
"""

from __future__ import annotations

import dataclasses
import inspect

import torch

BYT5_TOKENS = 256  # HunyuanVideo15Pipeline.tokenizer_2_max_length


def _pipeline():
    from diffusers import HunyuanVideo15Pipeline

    return HunyuanVideo15Pipeline


def chat_prefix() -> tuple[str, int]:
    """(system message, tokens cropped from the chat template) as the pipeline encodes prompts."""
    params = inspect.signature(_pipeline()._get_mllm_prompt_embeds).parameters
    return params["system_message"].default, params["crop_start"].default


@dataclasses.dataclass(frozen=True)
class Hunyuan15Text:
    """One prompt's conditioning, valid tokens only: Qwen states [1, L, D] with mask [1, L] (ones), ByT5 states
    [1, L2, D2] with mask [1, L2] (L2 = 0 without glyph text)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    embeds_2: torch.Tensor
    mask_2: torch.Tensor

    def to(self, device=None, dtype=None) -> "Hunyuan15Text":
        """On `device` in `dtype` (the pipeline casts the masks too; ones stay ones)."""
        return Hunyuan15Text(*(t.to(device=device, dtype=dtype) for t in dataclasses.astuple(self)))

    def transformer_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.embeds, "encoder_attention_mask": self.mask,
                "encoder_hidden_states_2": self.embeds_2, "encoder_attention_mask_2": self.mask_2}


def _valid(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    keep = mask[0].bool()
    return embeds[:, keep], mask[:, keep]


@torch.inference_mode()
def encode_prompt(components, prompt: str, max_tokens: int) -> Hunyuan15Text:
    pipe = _pipeline()
    system, crop = chat_prefix()
    qwen, byt5 = components.text_encoder, components.text_encoder_2
    embeds, mask = pipe._get_mllm_prompt_embeds(qwen, components.tokenizer, [prompt], qwen.device,
                                                tokenizer_max_length=max_tokens, system_message=system,
                                                crop_start=crop)
    embeds_2, mask_2 = pipe._get_byt5_prompt_embeds(components.tokenizer_2, byt5, [prompt], byt5.device,
                                                    tokenizer_max_length=BYT5_TOKENS)
    return Hunyuan15Text(*_valid(embeds, mask), *_valid(embeds_2, mask_2))
