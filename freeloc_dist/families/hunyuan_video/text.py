"""HunyuanVideo's text conditioning, as diffusers' HunyuanVideoPipeline computes it: the Llama encoder's
third-to-last hidden state of the prompt in the pipeline's prompt template (the template's first 95 tokens
cropped), and CLIP's pooled output of the bare prompt.

Padded text tokens are dropped here, before the blocks: the transformer masks padded keys everywhere, and its
token refiner pools over the valid tokens only, so the video output is the same (DESIGN 11), the joint attention
sees valid text only, and the mask passed on is all ones.
"""

from __future__ import annotations

import dataclasses

import torch

LLAMA_HIDDEN_LAYERS_SKIPPED = 2  # diffusers: hidden_states[-(2 + 1)]
CLIP_TOKENS = 77


def prompt_template() -> dict:
    """The pipeline's own prompt template (diffusers' DEFAULT_PROMPT_TEMPLATE: text and crop_start)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class HunyuanText:
    """One prompt's conditioning: embeds [1, L, D] (valid tokens only), mask [1, L] (ones), pooled [1, P]."""

    embeds: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def to(self, device=None, dtype=None) -> "HunyuanText":
        """On `device`, embeddings and pooled output in `dtype` (the pipeline casts the mask too; ones stay ones)."""
        return HunyuanText(self.embeds.to(device=device, dtype=dtype), self.mask.to(device=device, dtype=dtype),
                           self.pooled.to(device=device, dtype=dtype))

    def transformer_kwargs(self) -> dict:
        return {"encoder_hidden_states": self.embeds, "encoder_attention_mask": self.mask,
                "pooled_projections": self.pooled}


@torch.inference_mode()
def encode_prompt(components, prompt: str, max_tokens: int) -> HunyuanText:
    template = prompt_template()
    crop = template["crop_start"]
    tok, llama = components.tokenizer, components.text_encoder
    enc = tok([template["template"].format(prompt)], max_length=max_tokens + crop, padding="max_length",
              truncation=True, return_tensors="pt", return_attention_mask=True)
    ids, mask = enc.input_ids.to(llama.device), enc.attention_mask.to(llama.device)
    hidden = llama(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    embeds, mask = hidden[-(LLAMA_HIDDEN_LAYERS_SKIPPED + 1)][:, crop:], mask[:, crop:]
    valid = int(mask.sum())
    clip, clip_tok = components.text_encoder_2, components.tokenizer_2
    clip_ids = clip_tok([prompt], padding="max_length", max_length=CLIP_TOKENS, truncation=True,
                        return_tensors="pt").input_ids
    pooled = clip(clip_ids.to(clip.device), output_hidden_states=False).pooler_output
    return HunyuanText(embeds[:, :valid], mask[:, :valid], pooled)
