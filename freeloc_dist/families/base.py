"""The adapter one model family implements (DESIGN 11): how FreeLOC, the engine and probing reach into its
transformer. Methods take the built diffusers transformer (or one of its attention modules); none holds rank
logic. Tensor shapes: B batch, L tokens (frame-major), h heads, d head channels, F/H/W the token grid.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the registry is imported before any heavy work (preflight): no torch at import time
    import torch

    from ..rope import TemporalRope



def delegate(package: str, module: str, name: str):
    """An adapter method that calls `name` of the family folder `package`'s `module` with the same arguments. The
    module is imported on first use: the registry is imported before torch (preflight runs without it)."""
    def method(self, *args, **kwargs):
        return getattr(importlib.import_module(f"{package}.{module}"), name)(*args, **kwargs)
    method.__name__ = name
    return method


class Family:
    name: str = ""
    transformer_classes: tuple[str, ...] = ()  # class names this family serves, for error messages
    pipelines: tuple[str, ...] = ()  # model_index.json `_class_name`s of its model directories

    # -- model directories (configs only, no torch: preflight runs these before any heavy work) ------------
    def read_model_kind(self, model_dir) -> Any:
        """The freeloc_dist.families.kind.ModelKind of a model directory of this family."""
        raise NotImplementedError

    def check_model_dir(self, model_dir):
        """Verify the directory's layout without loading anything (ConfigError naming the missing file)."""
        raise NotImplementedError

    def check_weights_match_config(self, model_dir) -> None:
        """Every weight tensor's shape against the model its config builds (meta device); ConfigError."""
        raise NotImplementedError

    def weights_signature(self, model_dir) -> list:
        """[file, size, mtime] of every weight file (the resume fingerprint's view of the weights)."""
        raise NotImplementedError

    def load_components(self, model_dir, dtype, device, placement=None):
        """Every component of the model (freeloc_dist.models.Components), from a local directory; no download.
        `placement` (freeloc_dist.memory.Placement): where the transformer, the idle second expert and the text
        encoder(s) go (None: all on `device`); a text encoder placed on None is not loaded at all."""
        raise NotImplementedError

    def load_scheduler(self, model_dir):
        """The model's diffusers scheduler alone (a config, no weights): which timesteps a step count runs, so a
        two-expert model's expert schedule is known before loading (probing's preflight)."""
        raise NotImplementedError

    # -- LoRAs (freeloc_dist.loras) --------------------------------------------------------------------------
    def read_lora(self, path) -> tuple[dict, dict | None]:
        """(state dict, adapter metadata or None) of a local LoRA file, as the family's diffusers pipeline reads
        it (`lora_state_dict`: every format it converts, in diffusers' naming, keys prefixed by the component,
        `transformer.`); any exception for a file it cannot read."""
        raise NotImplementedError(f"LoRAs are not supported for the {self.name} family yet")

    def transformer_shapes(self, model_dir, expert: str) -> dict[str, tuple[int, ...]]:
        """{parameter name: shape} of the linear layers (weight [out, in], bias [out]) of one expert's transformer
        (a component name, e.g. "transformer_2"), built from its config on the meta device (no weight read, no
        memory): the layers a LoRA may update, checked before loading. The family's diffusers class
        (transformer_classes[0]) builds it; other modules (convolutions, embeddings) are not listed."""
        from pathlib import Path

        import diffusers
        import torch

        from .layout import config_of

        with torch.device("meta"):
            model = getattr(diffusers, self.transformer_classes[0]).from_config(config_of(Path(model_dir) / expert))
        return {f"{name}.{kind}": tuple(p.shape) for name, module in model.named_modules()
                if isinstance(module, torch.nn.Linear) for kind, p in module.named_parameters(recurse=False)}

    # -- inputs and VAE ---------------------------------------------------------------------------------------
    def encode_prompt(self, components, prompt: str, max_tokens: int):
        """Text states [1, L=max_tokens, D] of one prompt; positions past its real length are zero."""
        raise NotImplementedError

    def sampling_sigmas(self, steps: int):
        """The sigmas the family's pipeline hands its scheduler for `steps` steps (None: the scheduler's own)."""
        return None

    def text_kwargs(self, text) -> dict:
        """The transformer's keyword arguments for the text conditioning `encode_prompt` returned."""
        return {"encoder_hidden_states": text}

    def classifier_free(self, sampling) -> tuple[bool, float]:
        """(whether the render runs the unconditional pass, the scale that combines the two) from the config's
        sampling section: classifier-free guidance on sampling.guidance_scale > 1 (diffusers' Wan rule)."""
        from ..guidance import uses_cfg

        return uses_cfg(sampling.guidance_scale), sampling.guidance_scale

    def check_sampling(self, cfg) -> str | None:
        """What this family refuses in a render config, as one line (None: nothing)."""
        if cfg.sampling.true_cfg_scale != 1.0:
            return (f"sampling.true_cfg_scale={cfg.sampling.true_cfg_scale:g}: only guidance-embedded models "
                    "(HunyuanVideo) take a true-CFG scale; this model's classifier-free guidance is "
                    "sampling.guidance_scale")
        return None

    def vae_scale_factors(self, vae) -> tuple[int, int]:
        """(temporal, spatial) compression of the model's VAE."""
        raise NotImplementedError

    def latent_channels(self, vae) -> int:
        """C of the latents of the model's VAE."""
        return int(vae.config.z_dim)

    def patch_size(self, transformer) -> tuple[int, int, int]:
        """The transformer's (t, h, w) patch over the latents."""
        return tuple(transformer.config.patch_size)

    def owns_vae(self, vae) -> bool:
        """True if `vae` is this family's VAE."""
        raise NotImplementedError

    def can_decode_ranges(self, vae) -> bool:
        """Whether `iter_decode` can decode a part [start, end) of a video (else whole videos only)."""
        raise NotImplementedError

    def iter_decode(self, vae, latents, start: int = 0, end: int | None = None):
        """uint8 frame chunks [t, Hp, Wp, 3] of latent frames [start, end) of normalised latents [1, C, F, H, W],
        in order; any split of [0, F) into ranges decodes to exactly the frames of one pass."""
        raise NotImplementedError

    # -- a stock diffusers pipeline (freeloc_dist.pipeline) --------------------------------------------------
    def pipeline_prompt_texts(self, encode_prompt_output) -> list[dict]:
        """The prompts one call of the pipeline's encode_prompt returned, each as the transformer inputs (by
        keyword) that carry it: [positive, negative] or [one prompt] (a pipeline that encodes its negative prompt
        in a second call)."""
        raise NotImplementedError

    def pipeline_uses_cfg(self, pipe) -> bool:
        """Whether the pipeline's current call runs a separate unconditional pass (classifier-free guidance)."""
        raise NotImplementedError

    # -- memory settings (freeloc_dist.memory) ---------------------------------------------------------------
    text_encoder_fields: tuple[str, ...] = ("text_encoder",)  # the Components fields that hold text encoders

    def weight_blocks(self, transformer) -> list:
        """The transformer's repeated blocks, in forward order: the units whose weights are sharded over the sp
        group and gathered one at a time (memory.shard_weights)."""
        raise NotImplementedError

    def prompt_bytes(self, config, max_tokens: int, dtype_bytes: int) -> float:
        """Bytes of one prompt's text conditioning at most, as encode_prompt returns it (what memory.text_encoder:
        rank0 broadcasts), from the transformer's config: by default states [1, max_tokens, text_dim]."""
        return float(max_tokens * config.get("text_dim", 4096) * dtype_bytes)

    def weight_block_params(self, config) -> list[float]:
        """Parameters of each of those blocks, in forward order, from the transformer's config (the planner's sharded
        share, its largest gathered block and the all-gather bytes)."""
        raise NotImplementedError

    # -- the dry-run planner (freeloc_dist.planner) -----------------------------------------------------------
    vae_spatial: int = 8  # pixels per latent cell when the model directory is not here
    image_tokens: int = 0  # image tokens before the text when the model directory is not here

    def conditioning_pixel_frames(self, config, frames: int) -> int:
        """Frames of pixels the VAE encodes once for a conditioned transformer (`config`: in_channels above
        out_channels) rendering `frames` frames: the planner's one-off float32 buffer. Wan: the whole video (the
        image, then zeros or the last image)."""
        return frames

    def known_transformers(self) -> dict[str, dict[str, Any]]:
        """Published transformer configs by model id (with `_class_name`), for planning without weights."""
        return {}

    def known_kinds(self) -> dict[str, dict[str, Any]]:
        """What the planner needs of a published model's VAE and pipeline (vae_spatial, expand_timesteps,
        two_experts) when its directory is not here, by model id."""
        return {}

    def planner_config(self, config) -> dict[str, Any]:
        """The transformer config as the planner reads it: num_layers = FreeLOC (profile) layers, ffn_dim,
        num_attention_heads, attention_head_dim, in/out_channels, patch_size [t, h, w]."""
        return dict(config)

    def transformer_params(self, config) -> float:
        raise NotImplementedError

    def linear_flops_per_pass(self, config, video_tokens: int, text_tokens: int, text_runs: float = 1.0) -> float:
        """FLOPs of one transformer pass besides its FreeLOC (video-video) attention, for a rank with
        `video_tokens` video tokens and `text_tokens` text tokens; `text_runs`: texts whose keys and values one pass
        projects (a storyboard's runs of frames; families without per-frame text: always 1)."""
        raise NotImplementedError

    def text_encoder_params(self, config) -> float:
        """From text_encoder/config.json, or the published encoder's count when it is None."""
        raise NotImplementedError

    def image_encoder_params(self, transformer_config, config) -> float:
        """Parameters of the image encoder a transformer of `transformer_config` is rendered with (0: none), from
        image_encoder/config.json (`config`), or the published encoder's count when it is None."""
        raise NotImplementedError

    # -- storyboards (freeloc_dist.storyboard) ---------------------------------------------------------------
    per_frame_text: bool = False  # whether each latent frame can attend its own text (a storyboard)

    def install_frame_text(self, transformer):
        """Let the transformer take a storyboard.FrameText as `encoder_hidden_states`: the queries of each run of
        latent frames attend that run's conditioning, everything else as stock; returns the undo."""
        raise NotImplementedError(f"{self.name}: no per-frame text conditioning")

    def render_inputs(self, components, cfg, geometry, image, device, dtype):
        """(condition, token_timesteps) of a render: the image conditioning of the whole video (or None) and
        per-token timesteps (or None), as the family's pipeline builds them from the config's image(s)."""
        raise NotImplementedError

    def __deepcopy__(self, memo):
        return self  # stateless: a copied model keeps the one registered adapter

    def owns(self, transformer) -> bool:
        """True if `transformer` is one of this family's models."""
        raise NotImplementedError

    # -- attention surgery ------------------------------------------------------------------------------
    # True where text joins the video inside FreeLOC's attention layers (DESIGN 11, joint attention); then the
    # processor takes `joint_inputs`, `project_text_qkv` and `project_joint_out` too. False (Wan): text stays in a
    # separate cross-attention FreeLOC never touches.
    joint_text: bool = False

    def joint_inputs(self, args: tuple, kwargs: dict, num_video_tokens: int):
        """(text states [B, Lt, D], valid text keys Bool[B, Lt] or None) of a joint attention call."""
        raise NotImplementedError

    def project_text_qkv(self, attn, text: torch.Tensor):
        """q, k, v [B, Lt, h, d] of the text of a joint attention call (no RoPE: text carries none)."""
        raise NotImplementedError

    def project_joint_out(self, attn, out_video: torch.Tensor, out_text: torch.Tensor, dtype):
        """(video output, text output) of a joint attention call, as its stock processor returns them."""
        raise NotImplementedError

    def attention_layers(self, transformer) -> list[Any]:
        """The attention modules FreeLOC replaces, in forward order (the profile's layer index)."""
        raise NotImplementedError

    def stock_processor(self):
        """A new stock processor of this family's attention (what FreeLOC defers to on stock plans)."""
        raise NotImplementedError

    def freeloc_rotary(self, args: tuple, kwargs: dict):
        """The RoPE (cos, sin) of a processor call (its arguments after `attn, hidden_states`) that FreeLOC
        computes, or None when the call is one it leaves to the stock processor."""
        raise NotImplementedError

    def project_qkv(self, attn, hidden_states: torch.Tensor):
        """q, k, v [B, L, h, d] of one attention call: normalised as the stock processor does, not yet rotated."""
        raise NotImplementedError

    def project_out(self, attn, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The output projection of attention out [B, L, h, d]."""
        raise NotImplementedError

    def num_heads(self, transformer) -> int:
        return self.attention_layers(transformer)[0].heads

    def grid_of(self, transformer, hidden_states: torch.Tensor) -> tuple[int, int, int]:
        """(F, H, W) after patching, from the transformer input [B, C, F, H, W]."""
        raise NotImplementedError

    # -- RoPE ---------------------------------------------------------------------------------------------
    def temporal_rope(self, transformer) -> TemporalRope:
        """The temporal part of the model's RoPE (channels, theta), checked against its own tables."""
        raise NotImplementedError

    def rope_module(self, transformer) -> torch.nn.Module:
        """The module whose forward returns the (cos, sin) of its input's grid: the engine hooks it to hand
        each rank its own rows of the whole video's table."""
        raise NotImplementedError

    def global_rope(self, transformer, num_frames: int, height: int, width: int):
        """(cos, sin) of a whole video of `num_frames` latent frames, as the rope module would return them for
        an input of that size (latent height and width, before patching); tables grow to any length."""
        raise NotImplementedError

    def grow_rope(self, transformer, num_frames: int) -> bool:
        """Extend the model's RoPE tables to `num_frames` latent frames in place (bitwise the stock rows)."""
        raise NotImplementedError

    def set_temporal_frequency(self, transformer, index: int, omega: float):
        """Give temporal frequency `index` of the RoPE tables the angular frequency `omega` (radians per latent
        frame), in place (RIFLEx); returns the undo."""
        raise NotImplementedError
