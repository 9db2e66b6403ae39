"""A tiny random HunyuanVideo 1.5 model (text- or image-to-video), built offline, for tests and
configs/tiny-random-hunyuan15*.yaml.

The real layout in miniature: a HunyuanVideo15Transformer3DModel with 3 dual-stream blocks (3 profile layers; 2
heads x 16 channels, RoPE split t/h/w = 4/6/6 at theta 256, patch 1), an AutoencoderKLHunyuanVideo15 with the real
16x spatial / 4x temporal compression and 4 latent channels, a 3-layer Qwen2_5_VLTextModel (the pipeline takes its
third-to-last hidden state), a 1-layer T5EncoderModel for the ByT5 glyph text, a ClassifierFreeGuidance guider and
diffusers' FlowMatchEulerDiscreteScheduler; image-to-video adds a 1-layer SiglipVisionModel and its processor.
The tokenizers are built from in-memory vocabularies with the `tokenizers` library (nothing is downloaded): a
word-level Qwen tokenizer with a Qwen-style chat template whose prefix (system message included) splits into
exactly the pipeline's 108 cropped tokens, so the prompt starts where the real model's does, and a
character-level ByT5 tokenizer. The ByT5 projection's 2048-wide layer (fixed in diffusers) holds +-0.02 signs, so
its 16 MB file compresses to almost nothing in git. Weights depend only on `seed`; the outputs are noise.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from freeloc_dist.models import Components

from .loading import save_components
from .text import chat_prefix

TINY_TRAINED_FRAMES = 3  # declared T (freeloc.json): 31 latent frames would make every test render long
TINY_Z_DIM = 4
TINY_TEXT_DIM = 32
TINY_BYT5_DIM = 24
TINY_IMAGE_DIM = 16
TINY_TARGET_SIZE = 64  # the transformer's target_size: the I2V pipeline's bucket for a square image is 64 x 64
# Words of up to 10 characters (longer ones split, as subwords), punctuation runs, newlines and runs of spaces:
# the chat prefix below is then exactly the pipeline's crop (108 tokens).
_WORDS = r"<\|[a-z_]+\|>|\w{1,10}|[^\w\s]+|\n| {2,}"
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_PROMPT_WORDS = ("a red fox running through fresh snow in pine forest golden morning light tracking shot cat dog "
                 "on the beach at sunset waves ocean city street night rain slow motion close up of with and "
                 "blurry low quality static sign that says hello")


def _chat_text(prompt: str) -> str:
    system, _ = chat_prefix()
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
            "<|im_start|>assistant\n")


def build_tiny_tokenizers():
    """(Qwen-style tokenizer with the chat template, ByT5-style character tokenizer), tokenizers-backed."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    prefix = _chat_text("").split("<|im_end|>\n<|im_start|>assistant")[0]
    assert len(re.findall(_WORDS, prefix)) == chat_prefix()[1], "the tiny chat prefix must be the pipeline's crop"
    words = ["<|endoftext|>", "<unk>"]
    words += [w for w in dict.fromkeys(re.findall(_WORDS, _chat_text(_PROMPT_WORDS))) if w not in words]
    qwen = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    qwen.pre_tokenizer = pre_tokenizers.Split(Regex(_WORDS), behavior="removed", invert=True)
    # the generic fast class: it saves and loads these tokenizers bitwise (the model-specific ones rebuild theirs)
    qwen_tok = PreTrainedTokenizerFast(tokenizer_object=qwen, pad_token="<|endoftext|>", unk_token="<unk>",
                                       padding_side="right", model_max_length=32768, chat_template=CHAT_TEMPLATE)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,\"' "))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: 3 + i for i, c in enumerate(chars)}}
    byt5 = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    byt5.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    byt5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    byt5_tok = PreTrainedTokenizerFast(tokenizer_object=byt5, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                       padding_side="right", model_max_length=1024)
    return qwen_tok, byt5_tok


def build_tiny_components(seed: int = 0, image_to_video: bool = False) -> Components:
    """The tiny model in memory (float32, CPU, eval mode); deterministic for a seed."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    tokenizer, tokenizer_2 = build_tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = HunyuanVideo15Transformer3DModel(
            in_channels=2 * TINY_Z_DIM + 1, out_channels=TINY_Z_DIM, num_attention_heads=2, attention_head_dim=16,
            num_layers=3, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
            text_embed_dim=TINY_TEXT_DIM, text_embed_2_dim=TINY_BYT5_DIM, image_embed_dim=TINY_IMAGE_DIM,
            rope_axes_dim=(4, 6, 6), target_size=TINY_TARGET_SIZE, task_type="i2v" if image_to_video else "t2v")
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLHunyuanVideo15(latent_channels=TINY_Z_DIM, block_out_channels=(8, 8, 8, 8, 8),
                                          layers_per_block=1)
        torch.manual_seed(seed + 2)
        text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer), hidden_size=TINY_TEXT_DIM, intermediate_size=48, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
            bos_token_id=None, eos_token_id=None, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}))
        torch.manual_seed(seed + 3)
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=TINY_BYT5_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=3,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
        # Norm scales start at one, which would make e.g. the text's q/k norms interchangeable with the video's:
        # give every norm its own scale, so a test can tell them apart.
        for name, param in transformer.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.data.uniform_(0.5, 1.5)
        wide = transformer.context_embedder_2.linear_2.weight
        wide.data = torch.sign(torch.randn(wide.shape)) * 0.02
        image_encoder = image_processor = None
        if image_to_video:
            image_encoder, image_processor = _tiny_siglip(seed + 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    return Components(transformer=transformer.eval(), vae=vae.eval(), text_encoder=text_encoder.eval(),
                      tokenizer=tokenizer, scheduler=scheduler, trained_frames=TINY_TRAINED_FRAMES,
                      text_encoder_2=text_encoder_2.eval(), tokenizer_2=tokenizer_2, image_encoder=image_encoder,
                      image_processor=image_processor)


def _tiny_siglip(seed: int):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    encoder = SiglipVisionModel(SiglipVisionConfig(hidden_size=TINY_IMAGE_DIM, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2, image_size=32,
                                                   patch_size=8))
    return encoder.eval(), SiglipImageProcessor(size={"height": 32, "width": 32})


def tiny_guider(guidance_scale: float = 6.0):
    from diffusers.guiders import ClassifierFreeGuidance

    return ClassifierFreeGuidance(guidance_scale=guidance_scale)


def save_tiny_model(out_dir: str | Path, seed: int = 0, image_to_video: bool = False) -> Path:
    """Write the tiny model to `out_dir` in diffusers format (loadable by freeloc_dist.models and diffusers)."""
    return save_components(build_tiny_components(seed, image_to_video), out_dir, guider=tiny_guider())


def save_tiny_i2v_model(out_dir: str | Path, seed: int = 0) -> Path:
    return save_tiny_model(out_dir, seed, image_to_video=True)
