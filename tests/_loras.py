"""Tiny random LoRA files for the tiny Wan models (tests/test_fast_sampling.py, the matrix's LoRA row), and the
reference they are checked against: the same updates merged into the weights by hand from their definition."""

import json

import torch

# Two tiny random LoRAs for the tiny model (3 blocks, width 24, ffn 48): one in diffusers' own format with the
# adapter metadata diffusers saves (rank 4, alpha 8: scaling 2; lora_bias: a lora_B.bias on every layer), one in
# the original Wan format (`diffusion_model.` keys, lora_down/lora_up, alpha 3 at rank 2) that diffusers converts.
DIFFUSERS_LAYERS = {"blocks.{i}.attn1.to_q": (24, 24), "blocks.{i}.attn2.to_k": (24, 24),
                    "blocks.{i}.ffn.net.0.proj": (48, 24)}
WAN_LAYERS = {"blocks.{i}.self_attn.v": ("blocks.{i}.attn1.to_v", 24, 24),
              "blocks.{i}.ffn.2": ("blocks.{i}.ffn.net.2", 24, 48)}


def make_loras(folder, seed=0):
    """Write the two LoRA files; returns their paths and {layer: [(delta [out, in], bias delta or None)]} at
    scale 1, computed here from the definition (W + alpha / r B A)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: 0.3 * torch.randn(*shape, generator=g)  # noqa: E731
    deltas, first = {}, {}
    for i in range(3):
        for name, (out, inp) in DIFFUSERS_LAYERS.items():
            layer = name.format(i=i)
            a, b, bias = rand(4, inp), rand(out, 4), rand(out)
            first.update({f"transformer.{layer}.lora_A.weight": a, f"transformer.{layer}.lora_B.weight": b,
                          f"transformer.{layer}.lora_B.bias": bias})
            deltas.setdefault(layer, []).append((2.0 * b.double() @ a.double(), 2.0 * bias.double()))
    a, b, bias = rand(4, 24), rand(16, 4), rand(16)  # proj_out: 24 -> 4 channels x 2 x 2 patch
    first.update({"transformer.proj_out.lora_A.weight": a, "transformer.proj_out.lora_B.weight": b,
                  "transformer.proj_out.lora_B.bias": bias})
    deltas["proj_out"] = [(2.0 * b.double() @ a.double(), 2.0 * bias.double())]
    metadata = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.lora_bias": True,
                "transformer.target_modules": ["to_q", "to_k", "net.0.proj", "proj_out"]}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(first, folder / "style.safetensors", metadata={"lora_adapter_metadata": json.dumps(metadata)})
    second = {}
    for i in range(3):
        for theirs, (ours, out, inp) in WAN_LAYERS.items():
            key, layer = f"diffusion_model.{theirs.format(i=i)}", ours.format(i=i)
            down, up = rand(2, inp), rand(out, 2)
            second.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                           f"{key}.alpha": torch.tensor(3.0)})
            deltas.setdefault(layer, []).append((1.5 * up.double() @ down.double(), None, "second"))
    save_file(second, folder / "distill.safetensors")
    return folder / "style.safetensors", folder / "distill.safetensors", deltas


def merged(transformer, deltas, scales):
    """A copy of `transformer` with the LoRAs merged by hand (float64): scales = (first's, second's)."""
    import copy

    model = copy.deepcopy(transformer)
    with torch.no_grad():
        for layer, items in deltas.items():
            module = model.get_submodule(layer)
            for item in items:
                s = scales[1] if item[-1] == "second" else scales[0]
                module.weight.copy_(module.weight.double() + s * item[0])
                if item[1] is not None:
                    module.bias.copy_(module.bias.double() + s * item[1])
    return model


# ---- any family: random LoRAs shaped from a model's linear layers (Family.transformer_shapes) ----------------
def random_updates(shapes, layers, rank, seed):
    """{layer: (lora_A [rank, in], lora_B [out, rank], lora_B.bias [out])}, random, for the named linear layers
    of `shapes` ({parameter: shape}, as Family.transformer_shapes gives them)."""
    g = torch.Generator().manual_seed(seed)
    updates = {}
    for layer in layers:
        out, inp = shapes[f"{layer}.weight"]
        updates[layer] = tuple(0.3 * torch.randn(*s, generator=g) for s in ((rank, inp), (out, rank), (out,)))
    return updates


def save_diffusers_lora(path, updates, *, alpha=None, bias=False, prefix="transformer."):
    """`updates` in diffusers' format: `prefix` + layer + .lora_A/.lora_B(.bias); with `alpha`, the adapter
    metadata as diffusers writes it (prefixed keys, r, lora_alpha, lora_bias, target_modules)."""
    from safetensors.torch import save_file

    tensors = {}
    for layer, (a, b, b_bias) in updates.items():
        tensors |= {f"{prefix}{layer}.lora_A.weight": a, f"{prefix}{layer}.lora_B.weight": b}
        if bias:
            tensors[f"{prefix}{layer}.lora_B.bias"] = b_bias
    header = None
    if alpha is not None:
        rank = next(iter(updates.values()))[0].shape[0]
        settings = {"r": rank, "lora_alpha": alpha, "lora_bias": bias, "target_modules": sorted(updates)}
        header = {"lora_adapter_metadata": json.dumps({f"{prefix}{k}": v for k, v in settings.items()})}
    save_file(tensors, path, metadata=header)
    return path


def save_original_hunyuan_lora(path, num_double, num_single, width, ffn, rank=2, seed=1):
    """A LoRA in the original HunyuanVideo format (`diffusion_model.` keys, the fused `img_attn_qkv`, the
    original module names) that diffusers' HunyuanVideoPipeline converts: each dual-stream block's image qkv and
    text MLP input, each single-stream block's output projection (`linear2`). (Single-stream `linear1` is left
    out: diffusers' converter splits it at HunyuanVideo's width 3072, which a tiny model does not have.)"""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    layers = {**{f"double_blocks.{i}.img_attn_qkv": (3 * width, width) for i in range(num_double)},
              **{f"double_blocks.{i}.txt_mlp.fc1": (ffn, width) for i in range(num_double)},
              **{f"single_blocks.{i}.linear2": (width, width + ffn) for i in range(num_single)}}
    tensors = {}
    for layer, (out, inp) in layers.items():
        tensors[f"diffusion_model.{layer}.lora_A.weight"] = 0.3 * torch.randn(rank, inp, generator=g)
        tensors[f"diffusion_model.{layer}.lora_B.weight"] = 0.3 * torch.randn(out, rank, generator=g)
    save_file(tensors, path)
    return path


# HunyuanVideo v1, tiny (assets/tiny-hunyuan): width 32 (2 heads x 16), ffn 64, 2 dual- and 2 single-stream blocks,
# 1 refiner block. Diffusers' format (rank 4, alpha 8: scaling 2, a lora_B.bias on every layer) on the dual-stream
# blocks' video and text projections, the single-stream blocks' attention, MLP and output, the token refiner, the
# guidance embedder and the output projection; and the original HunyuanVideo format that diffusers converts.
HUNYUAN_LAYERS = [
    *(f"transformer_blocks.{i}.{m}" for i in range(2)
      for m in ("attn.to_q", "attn.add_k_proj", "attn.to_add_out", "ff.net.0.proj")),
    *(f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn.to_v", "proj_mlp", "proj_out")),
    "context_embedder.token_refiner.refiner_blocks.0.attn.to_q", "time_text_embed.guidance_embedder.linear_1",
    "proj_out"]


def make_hunyuan_loras(folder):
    """(diffusers-format file, original-format file) for the tiny HunyuanVideo, shaped from its linear layers."""
    from freeloc_dist.config import REPO_ROOT
    from freeloc_dist.family import model_family

    model = REPO_ROOT / "assets" / "tiny-hunyuan"
    shapes = model_family(model).transformer_shapes(model, "transformer")
    folder.mkdir(parents=True, exist_ok=True)
    style = save_diffusers_lora(folder / "style.safetensors", random_updates(shapes, HUNYUAN_LAYERS, 4, 0), alpha=8,
                                bias=True)
    original = save_original_hunyuan_lora(folder / "original.safetensors", num_double=2, num_single=2, width=32,
                                          ffn=64)
    return style, original


# HunyuanVideo 1.5, tiny: width 32, 3 dual-stream blocks, 1 refiner block (diffusers' format only: no 1.5 converter)
HUNYUAN15_LAYERS = [f"transformer_blocks.{i}.{m}" for i in range(3)
                    for m in ("attn.to_k", "attn.add_v_proj", "ff_context.net.2", "norm1.linear")] + \
                   ["context_embedder.token_refiner.refiner_blocks.0.ff.net.0.proj", "proj_out"]


def make_hunyuan15_lora(folder):
    """A diffusers-format file (rank 2, alpha 6: scaling 3) for the tiny HunyuanVideo 1.5, shaped from its layers."""
    from freeloc_dist.config import REPO_ROOT
    from freeloc_dist.family import model_family

    model = REPO_ROOT / "assets" / "tiny-hunyuan15"
    shapes = model_family(model).transformer_shapes(model, "transformer")
    folder.mkdir(parents=True, exist_ok=True)
    return save_diffusers_lora(folder / "style.safetensors", random_updates(shapes, HUNYUAN15_LAYERS, 2, 3), alpha=6)
