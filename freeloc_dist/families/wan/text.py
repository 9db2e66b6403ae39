"""Wan's text conditioning: the UMT5 encoder's last hidden state, padded to a fixed length with zeros."""

from __future__ import annotations

import torch


@torch.inference_mode()
def encode_prompt(text_encoder, tokenizer, prompt: str, max_tokens: int) -> torch.Tensor:
    """UMT5 last hidden state [1, L=max_tokens, D]; positions past the prompt's real length are zero."""
    enc = tokenizer([prompt], padding="max_length", max_length=max_tokens, truncation=True,
                    add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = text_encoder.device
    ids = enc["input_ids"].to(device)  # [1, L]
    mask = enc["attention_mask"].to(device)  # [1, L]
    hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # [1, L, D]
    return hidden * mask[..., None].to(hidden.dtype)
