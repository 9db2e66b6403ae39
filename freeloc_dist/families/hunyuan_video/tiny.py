"""A tiny random HunyuanVideo (text-to-video) model, built offline, for tests and configs/tiny-random-hunyuan.yaml.

The real layout in miniature: a HunyuanVideoTransformer3DModel with 2 dual- and 2 single-stream blocks (4 profile
layers; 2 heads x 16 channels, RoPE split t/h/w = 4/6/6 at theta 256, guidance embedded), an
AutoencoderKLHunyuanVideo with the real 8x spatial / 4x temporal compression, a 2-layer LlamaModel and a 2-layer
CLIPTextModel, and diffusers' FlowMatchEulerDiscreteScheduler at HunyuanVideo's shift 7. The tokenizers are built
from an in-memory vocabulary with the `tokenizers` library (nothing is downloaded): a word-level Llama tokenizer
that splits the pipeline's prompt template into exactly its 95 cropped tokens, so the prompt starts where the
real model's does, and a character-level CLIP tokenizer. Weights depend only on `seed`; the outputs are noise.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from freeloc_dist.models import Components

from .loading import save_components
from .text import prompt_template

TINY_TRAINED_FRAMES = 5  # declared T (model_index.json): 33 latent frames would make every test render long
TINY_Z_DIM = 4
TINY_TEXT_DIM = 32
TINY_POOLED_DIM = 16
# Splits the template into 95 tokens before its placeholder: header tags whole, words, punctuation runs, "\n\n".
_WORDS = r"<\|[a-z_]+\|>|\w+|[^\w\s]+|\n\n"
_PROMPT_WORDS = ("a red fox running through fresh snow in pine forest golden morning light tracking shot cat dog "
                 "on the beach at sunset waves ocean city street night rain slow motion close up of with and "
                 "blurry low quality static")


def build_tiny_tokenizers():
    """(Llama tokenizer, CLIP tokenizer), both tokenizers-backed, from in-memory vocabularies."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>"] + sorted(set(re.findall(_WORDS, prompt_template()["template"])) - {"<pad>", "<unk>"})
    tags = sorted(set(re.findall(r"<\|[a-z_]+\|>", prompt_template()["template"])))  # whole, as after the prompt
    words += [w for w in tags + _PROMPT_WORDS.split() if w not in words]
    llama = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    llama.pre_tokenizer = pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True)
    # the generic fast class for both: transformers' LlamaTokenizer and CLIPTokenizer rebuild their own pre-tokenizers
    # and models from the vocabulary on loading, so only the generic class saves and loads these bitwise
    llama_tok = PreTrainedTokenizerFast(tokenizer_object=llama, pad_token="<pad>", unk_token="<unk>", bos_token=None,
                                   eos_token=None, padding_side="right", model_max_length=4096)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,"))
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({c: 2 + i for i, c in enumerate(chars)})
    vocab.update({c + "</w>": 2 + len(chars) + i for i, c in enumerate(chars)})
    clip = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>", end_of_word_suffix="</w>"))
    clip.pre_tokenizer = pre_tokenizers.Whitespace()
    clip.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    clip_tok = PreTrainedTokenizerFast(tokenizer_object=clip, pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                             bos_token="<|startoftext|>", eos_token="<|endoftext|>", model_max_length=77)
    return llama_tok, clip_tok


def build_tiny_components(seed: int = 0) -> Components:
    """The tiny model in memory (float32, CPU, eval mode); deterministic for a seed."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoTransformer3DModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    tokenizer, tokenizer_2 = build_tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=TINY_Z_DIM, out_channels=TINY_Z_DIM, num_attention_heads=2, attention_head_dim=16,
            num_layers=2, num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
            text_embed_dim=TINY_TEXT_DIM, pooled_projection_dim=TINY_POOLED_DIM, rope_axes_dim=(4, 6, 6),
            guidance_embeds=True)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=TINY_Z_DIM, block_out_channels=(4, 4, 4, 4), layers_per_block=1, norm_num_groups=2,
            spatial_compression_ratio=8, temporal_compression_ratio=4)
        torch.manual_seed(seed + 2)
        text_encoder = LlamaModel(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0))
        torch.manual_seed(seed + 3)
        text_encoder_2 = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=TINY_POOLED_DIM, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
            projection_dim=TINY_POOLED_DIM))
        # Norm scales start at one, which would make e.g. the text's q/k norms interchangeable with the video's:
        # give every norm its own scale, so a test can tell them apart.
        for name, param in transformer.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.data.uniform_(0.5, 1.5)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)  # HunyuanVideo's
    return Components(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=tokenizer, scheduler=scheduler, trained_frames=TINY_TRAINED_FRAMES,
                      text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2)


def save_tiny_model(out_dir: str | Path, seed: int = 0) -> Path:
    """Write the tiny model to `out_dir` in diffusers format (loadable by freeloc_dist.models)."""
    return save_components(build_tiny_components(seed), out_dir)
