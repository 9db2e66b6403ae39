"""torchrun worker: diffusers' stock WanImageToVideoPipeline on the tiny Wan2.1 I2V model with enable_freeloc +
parallelize_pipeline; every rank writes its final latents to OUT.rankR (tests/test_i2v_dist.py)."""

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pipeline_and_args(model="tiny-i2v"):
    """The pipeline, FreeLOC on, and the call's arguments (F = 9 > T = 5; prompt embeddings given, as in
    tests/test_family.py: the pipeline's own prompt cleaning needs ftfy)."""
    import torch
    from diffusers import WanImageToVideoPipeline
    from PIL import Image

    from freeloc_dist import enable_freeloc
    from freeloc_dist.models import load_components
    from freeloc_dist.sampling import encode_prompt

    parts = load_components(os.path.join(ROOT, "assets", model), "float32")
    pipe = WanImageToVideoPipeline(tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, vae=parts.vae,
                                   scheduler=parts.scheduler, transformer=parts.transformer,
                                   image_encoder=parts.image_encoder, image_processor=parts.image_processor)
    pipe.set_progress_bar_config(disable=True)
    enable_freeloc(pipe, os.path.join(ROOT, "configs", "profiles", "tiny-random-i2v.yaml"))
    image = Image.open(os.path.join(ROOT, "assets", "i2v-first.png")).convert("RGB").resize((32, 32))
    args = dict(image=image, prompt_embeds=encode_prompt(parts, "a fox", 512),
                negative_prompt_embeds=encode_prompt(parts, "blurry", 512),
                height=32, width=32, num_frames=33, num_inference_steps=2, guidance_scale=4.0, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    return pipe, args


def main():
    import torch

    from freeloc_dist import parallelize_pipeline

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--cfg", type=int, default=1)
    a = p.parse_args()
    pipe, args = pipeline_and_args()
    parallelize_pipeline(pipe, cfg_degree=a.cfg)
    with torch.no_grad():
        latents = pipe(**args).frames
    torch.save(latents, f"{a.out}.rank{os.environ['RANK']}")


if __name__ == "__main__":
    main()
    from freeloc_dist.parallel.exit import exit_process

    exit_process(0)
