"""Small random models and tensors shared by the core tests."""

from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

# A profile for a 3-layer tiny transformer: one layer of each kind, trained on 4 latent frames.
THREE_LAYERS = {
    "model": "tiny-random",
    "trained_frames": 4,
    "source": "test",
    "layers": {"tsa": [0], "vrpr": [1], "full": [2]},
    "tsa": {"dense_frames": 1, "stripe_frames": 3, "stripe_width": 2, "sink_frames": [0]},
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add synchronisation, which on a busy machine costs 10x. Autouse in every
    test module that imports it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_transformer(num_layers=2, heads=3, head_dim=12, seed=0):
    """A random Wan transformer: head_dim 12 gives RoPE t/h/w dims 4/4/4."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=num_layers,
        rope_max_seq_len=64,
    )
    return model.eval()


def transformer_inputs(num_frames, height=4, width=6, seed=1):
    """Latents [1, 4, F, height, width] (grid F x height/2 x width/2), timestep, text states."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, num_frames, height, width, generator=g)
    text = torch.randn(1, 7, 16, generator=g)
    return dict(hidden_states=latents, timestep=torch.tensor([500]), encoder_hidden_states=text, return_dict=False)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def tiny_pipeline(two_experts=False):
    from diffusers import WanPipeline

    from freeloc_dist.families.wan.tiny import build_tiny_components

    c = build_tiny_components(seed=0)
    extra = {}
    if two_experts:
        extra = dict(transformer_2=build_tiny_components(seed=3).transformer, boundary_ratio=0.5)
    pipe = WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, transformer=c.transformer, vae=c.vae,
                       scheduler=c.scheduler, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


TINY_PROFILE = str(Path(__file__).resolve().parent.parent / "configs" / "profiles" / "tiny-random.yaml")
# trained_frames 5: 17 frames = 5 latent frames, 77 = 20


def render(pipe, frames, **kw):
    args = dict(prompt="a red fox", negative_prompt="blurry", num_frames=frames, height=32, width=32,
                num_inference_steps=2, guidance_scale=4.0, max_sequence_length=16, output_type="latent",
                generator=torch.Generator().manual_seed(0))
    return pipe(**{**args, **kw}).frames


# diffusers' caches on the tiny pipeline, set so that each really skips work within CACHE_STEPS steps (first block
# cache 0.05 decides but never skips there: the decision is still made over the ranks), all in float32
CACHE_STEPS = 8
CACHE_FRAMES = 25  # 7 latent frames: past the tiny profile's trained 5
CACHES = ("first_block_0.05", "first_block_0.1", "first_block_0.3", "mag", "sea", "taylorseer", "text_kv")


def enable_cache(pipe, name, steps=CACHE_STEPS):
    import diffusers

    if name.startswith("first_block"):
        config = diffusers.FirstBlockCacheConfig(threshold=float(name.rsplit("_", 1)[1]))
    elif name == "mag":
        config = diffusers.MagCacheConfig(threshold=0.5, num_inference_steps=steps, mag_ratios=[1.0] * steps)
    elif name == "sea":
        config = diffusers.SeaCacheConfig(threshold=0.5)
    elif name == "taylorseer":  # Wan's attention modules are attn1/attn2 (the default patterns miss them)
        config = diffusers.TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                 cache_identifiers=[r"blocks\.\d+\.attn\d"],
                                                 taylor_factors_dtype=torch.float32)
    elif name == "pab":
        config = diffusers.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=lambda: pipe.current_timestep)
    else:
        config = diffusers.TextKVCacheConfig()
    pipe.transformer.enable_cache(config)


def count_full_passes(pipe) -> list:
    """A list that grows by one each time the transformer's last block really runs (not skipped by a cache)."""
    calls = []
    pipe.transformer.blocks[-1].ffn.register_forward_hook(lambda *a: calls.append(1))
    return calls
