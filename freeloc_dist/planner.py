"""The dry-run planner: what a render will cost per rank, from shapes and configs alone (no weights).

Inputs: the render config, the transformer's config.json (a built-in copy for the published Wan2.1 models and
Wan2.2 TI2V-5B when the weights are not on this machine), the FreeLOC profile, the world size. Outputs, per rank:
tokens; memory (weights, activations, K/V buffers, latents); attention FLOPs by layer kind (TSA and long-range
layers, reported as "vrpr+long", from their plan's density); bytes received per step (the engine's own byte
model, freeloc_dist.parallel.shards) and a time estimate at a stated peak throughput. Frame tables only
(freeloc_dist.plan.layer_plan), so it is instant even at F=481. Every number is an estimate with the formula
next to it; the time is a lower bound (compute at the stated peak, communication not overlapped is not added).

Model of memory (inference, one layer live at a time):
  weights      = what the `memory:` settings keep on the device (freeloc_dist.memory_plan: whole or sharded
                 experts, the idle expert offloaded, the text encoder only while encoding or on the host); the
                 total is the peak of encoding (weights + text encoder) and sampling (every line)
  activations  = local tokens x (8 d + ffn) x dtype bytes  (residual, norm, q, k, v, attention out, FFN hidden)
  K/V buffers  = K and V frames a rank receives for its worst layer (neighbour: all needed frames at once;
                 Ulysses / hybrid: what it receives; ring: two blocks in flight)
  latents      = global latents, prediction and scheduler history, float32 (every rank holds the video)
  timestep tables (per-token timesteps, Wan2.2 TI2V) = local tokens x d x (7 x dtype bytes + 6 x 4): the
                 modulation of every token, timestep_proj [L, 6 d] and temb [L, d] in the model's dtype for the
                 whole forward, and one block's float32 [L, 6 d] sum with its scale-shift table
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from freeloc_dist.config import RenderConfig

from .errors import UserError
from .families.kind import FRAMES_RULE

GiB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

class RenderPlanError(UserError, ValueError):
    """The render cannot be planned or does not fit; one line."""


@dataclasses.dataclass
class RenderPlan:
    world_size: int
    cfg_degree: int
    sp_degree: int
    latent_frames: int
    tokens_per_frame: int
    tokens: int
    tokens_per_rank: int  # worst rank
    layers_by_kind: dict[str, int]
    density_by_kind: dict[str, float]
    strategy_by_kind: dict[str, str]
    memory_bytes: dict[str, float]  # per rank
    attention_flops_by_kind: dict[str, float]  # per rank per step
    linear_flops: float  # per rank per step
    bytes_per_step: dict[str, float]  # received per rank per step, by layer kind (+ gather, cfg)
    steps: int
    peak_tflops: float
    device_memory_gb: float
    memory_settings: Any = None  # freeloc_dist.memory_plan.MemorySettings the plan counts
    experts: int = 1  # transformers of the model (2: Wan2.2 A14B)
    settings_chosen: bool = False  # the configured settings did not fit; the planner chose these
    encoding_bytes: float = 0.0  # the text encoder on the device while the prompts are encoded
    host_bytes: dict[str, float] = dataclasses.field(default_factory=dict)  # host memory the settings add
    bytes_per_job: dict[str, float] = dataclasses.field(default_factory=dict)  # moved once per render
    text_encodings: int = 0  # text-encoder passes of the busiest rank, once per render (a storyboard's texts)
    text_encoder_flops: float = 0.0  # their FLOPs, once per render
    text_runs: int = 1  # cross-attention K/V projections per conditional (+ unconditional) pass set, worst rank
    num_layers: int = 0  # FreeLOC (profile) layers of the model
    trained_frames: int | None = None  # T of the profile (None: stock attention)

    @property
    def memory_total(self) -> float:
        from .memory_plan import peak

        return peak(self.memory_bytes, self.encoding_bytes)

    @property
    def flops_per_step(self) -> float:
        return sum(self.attention_flops_by_kind.values()) + self.linear_flops

    @property
    def seconds(self) -> float:
        return self.flops_per_step * self.steps / (self.peak_tflops * 1e12)


def family_of_config(transformer_cfg: Mapping[str, Any]):
    """The family of a transformer config (config.json's `_class_name`, built-in configs carry it too)."""
    from freeloc_dist.families import registered

    name = transformer_cfg.get("_class_name")
    for family in registered():
        if name in family.transformer_classes:
            return family
    raise RenderPlanError(f"transformer config: _class_name={name!r}: not a supported transformer")


def _known(table: str) -> dict[str, dict[str, Any]]:
    """A planner table (published configs by model id) over every registered family."""
    from freeloc_dist.families import registered

    return {model: entry for family in registered() for model, entry in getattr(family, table)().items()}


KNOWN_TRANSFORMERS = _known("known_transformers")
KNOWN_KINDS = _known("known_kinds")


def transformer_params(t: Mapping[str, Any]) -> float:
    """Parameter count of a transformer from its config (the family's formula)."""
    return family_of_config(t).transformer_params(t)


def plan_render(cfg: RenderConfig, transformer_cfg: Mapping[str, Any], profile=None, *, world_size: int,
                text_encoder_cfg: Mapping[str, Any] | None = None, device_memory_gb: float = 80.0,
                peak_tflops: float = 400.0, model_kind=None,
                image_encoder_cfg: Mapping[str, Any] | None = None) -> RenderPlan:
    """Plan one render on `world_size` ranks. Raises RenderPlanError if it cannot run or does not fit.
    `model_kind`: the model's freeloc_dist.family.ModelKind when its directory is here (the VAE's real spatial
    factor; a second expert's weights, resident on every rank beside the first). A transformer with image
    cross-attention (`image_dim`, Wan2.1 I2V) adds its image tokens to the cross-attention length; a model
    rendered with an image encoder (Wan2.1 I2V's CLIP, HunyuanVideo 1.5 I2V's SigLIP) adds its float32 weights
    (`image_encoder_cfg`, else the published encoder's count: the family's image_encoder_params)."""
    from freeloc_dist.parallel.decisions import check_world, layer_strategy, received_elements
    from freeloc_dist.parallel.shards import frame_shards
    from freeloc_dist.plan import layer_plan

    family = family_of_config(transformer_cfg)
    t = family.planner_config(transformer_cfg)
    heads, head_dim, layers = t["num_attention_heads"], t["attention_head_dim"], t["num_layers"]
    d, ffn = heads * head_dim, t["ffn_dim"]
    _, ph, pw = t.get("patch_size", [1, 2, 2])
    cfg_degree = cfg.parallel.cfg_degree
    num_frames = cfg.latent_frames
    try:
        sp = check_world(world_size, cfg_degree=cfg_degree, latent_frames=num_frames, strategy=cfg.parallel.strategy,
                         heads=heads, guidance_scale=cfg.sampling.guidance_scale)
    except ValueError as e:
        raise RenderPlanError(str(e)) from None
    known = KNOWN_KINDS.get(profile.model, {}) if profile is not None else {}
    spatial = model_kind.vae_spatial if model_kind is not None else known.get("vae_spatial", family.vae_spatial)
    per_token = model_kind.expand_timesteps if model_kind is not None else known.get("expand_timesteps", False)
    two_experts = model_kind.two_experts if model_kind is not None else known.get("two_experts", False)
    h, w = cfg.video.height // (spatial * ph), cfg.video.width // (spatial * pw)
    n = h * w
    shards = frame_shards(num_frames, sp)
    local_frames = max(shards.sizes)
    act_bytes = DTYPE_BYTES[cfg.model.dtype]
    use_cfg, _ = family.classifier_free(cfg.sampling)  # Wan: the first scale decides (not guidance_scale_2)
    passes = (2 if use_cfg else 1) // (cfg_degree if use_cfg else 1)  # transformer passes per rank per step
    text_len = cfg.sampling.max_text_tokens
    encodings, runs = text_work(cfg, num_frames, shards, use_cfg)  # runs: text K/V projections per rank per step
    text_encoder_flops = 2.0 * family.text_encoder_params(text_encoder_cfg) * cfg.sampling.max_text_tokens * encodings
    if t.get("image_dim"):  # CLIP tokens join the cross-attention keys
        text_len += model_kind.image_tokens if model_kind is not None else family.image_tokens

    # Layer specs, not bare kinds: "vrpr+long" layers (a sparse long range) are planned and reported apart.
    kinds = [profile.layer_spec(i) for i in range(profile.num_layers)] if profile is not None else ["full"] * layers
    if len(kinds) != layers:
        raise RenderPlanError(f"the profile lists {len(kinds)} layers, the model has {layers}")
    trained = profile.trained_frames if profile is not None else 1 << 30
    # What does not need the layer plans is counted first: a render that cannot fit (400001 frames, or
    # 16000x16000 pixels) is refused before any frame table of F x F entries is built.
    local_tokens = local_frames * n
    latent_elems = t["out_channels"] * num_frames * (h * ph) * (w * pw)
    weights_of = _weights_planner(cfg, t, family, text_encoder_cfg, sp=sp, passes=passes, two_experts=two_experts,
                                  world_size=world_size, prompts=encodings)
    image_encoder = family.image_encoder_params(t, image_encoder_cfg)
    pixel_frames = (family.conditioning_pixel_frames(t, FRAMES_RULE.frames(num_frames))
                    if t["in_channels"] != t["out_channels"] else 0)
    memory = {
        **({"weights: image encoder": image_encoder * 4} if image_encoder else {}),  # float32 (every family's loader)
        "activations": float(local_tokens) * (8 * d + ffn) * act_bytes,
        **({"timestep tables": float(local_tokens) * d * (7 * act_bytes + 6 * 4)} if per_token else {}),
        "K/V buffers": 0.0,
        "latents": float(latent_elems) * 4 * 5,  # latents, prediction, 2 scheduler history, noise
        # image-to-video: the whole video's conditioning channels (mask + C, transformer dtype) and, while it
        # is built once before the first step, the float32 pixels the VAE encodes (every rank: DESIGN 10)
        **({"conditioning": float((t["in_channels"] - t["out_channels"]) * num_frames * h * ph * w * pw) * act_bytes}
           if t["in_channels"] != t["out_channels"] else {}),
        **({"conditioning video (once)": 3.0 * 4 * pixel_frames * cfg.video.height * cfg.video.width}
           if pixel_frames else {}),
        "frame tables (host)": frame_table_bytes(num_frames, len(set(kinds))),
    }
    _choose_settings(cfg, weights_of, memory, device_memory_gb)  # before any frame table is built
    layers_by_kind: dict[str, int] = {}
    density, strategy, attn_flops, comm = {}, {}, {}, {}
    kv_buffer = 0.0
    for kind in sorted(set(kinds)):
        count = kinds.count(kind)
        layers_by_kind[kind] = count
        base, _, long = kind.partition("+")
        plan = layer_plan(base, (num_frames, h, w), trained,
                          vrpr=profile.vrpr if profile is not None else None,
                          tsa=profile.tsa if profile is not None else None,
                          long_range=profile.long_range.params if long else None)
        dens = plan.density()
        density[kind] = dens
        # QK^T and PV: 2 x 2 x Lq x Lk x d multiply-adds at the attended density, for this rank's queries
        attn_flops[kind] = 4.0 * (local_frames * n) * (num_frames * n) * d * dens * count * passes
        strat = "local" if sp == 1 else layer_strategy(plan, shards, heads, head_dim, cfg.parallel.strategy)
        strategy[kind] = strat
        if strat != "local":
            received = max(received_elements(strat, plan, shards, heads, head_dim))
            comm[kind] = float(received) * act_bytes * count * passes
            buffer = (4 * local_frames * n * d if strat == "ring" else received) * act_bytes
            kv_buffer = max(kv_buffer, float(buffer))
    memory["K/V buffers"] = kv_buffer
    settings, chosen, weights = _choose_settings(cfg, weights_of, memory, device_memory_gb)
    memory = {**weights.device, **memory}
    comm.update(weights.per_step)
    # Everything but the FreeLOC attention (the family's count: projections, MLPs, the text's attention scores);
    # a storyboard projects the text K/V of `runs` texts over the passes of a step instead of one per pass
    linear = family.linear_flops_per_pass(t, local_tokens, text_len, text_runs=runs / passes) * passes
    if sp > 1:
        # the prediction's other frames, float32 (Comm.gather_frames), for the rank with the smallest shard
        comm["gather"] = float(t["out_channels"] * (num_frames - min(shards.sizes)) * (h * ph) * (w * pw)) * 4
    if cfg_degree == 2 and use_cfg:
        comm["cfg"] = float(t["out_channels"] * local_frames * (h * ph) * (w * pw)) * 4
    result = RenderPlan(world_size=world_size, cfg_degree=cfg_degree, sp_degree=sp, latent_frames=num_frames,
                        tokens_per_frame=n, tokens=num_frames * n, tokens_per_rank=local_tokens,
                        layers_by_kind=layers_by_kind, density_by_kind=density, strategy_by_kind=strategy,
                        memory_bytes=memory, attention_flops_by_kind=attn_flops, linear_flops=linear,
                        bytes_per_step=comm, steps=cfg.sampling.steps, peak_tflops=peak_tflops,
                        device_memory_gb=device_memory_gb, memory_settings=settings, settings_chosen=chosen,
                        experts=2 if two_experts else 1,
                        encoding_bytes=weights.encoding, host_bytes=weights.host, bytes_per_job=weights.per_job,
                        text_encodings=encodings, text_encoder_flops=text_encoder_flops, text_runs=runs,
                        num_layers=layers, trained_frames=profile.trained_frames if profile is not None else None)
    return result


def _weights_planner(cfg, t, family, text_encoder_cfg, *, sp, passes, two_experts, world_size, prompts):
    """settings -> freeloc_dist.memory_plan.WeightPlan of this render."""
    from .memory_plan import plan_weights

    def weights_of(settings):
        return plan_weights(settings, transformer_params=transformer_params(t),
                            block_params=family.weight_block_params(t), experts=2 if two_experts else 1,
                            text_encoder_params=family.text_encoder_params(text_encoder_cfg),
                            dtype_bytes=DTYPE_BYTES[cfg.model.dtype], sp=sp, passes=passes, prompts=prompts,
                            prompt_bytes=family.prompt_bytes(t, cfg.sampling.max_text_tokens,
                                                             DTYPE_BYTES[cfg.model.dtype]),
                            world=world_size)
    return weights_of


def _choose_settings(cfg, weights_of, other: Mapping[str, float], device_memory_gb: float):
    """(settings, chosen, WeightPlan): the configured `memory:` settings when they fit beside the `other` lines,
    else the first of memory_plan.CANDIDATES that fits; a one-line refusal when none does."""
    from .memory_plan import CANDIDATES, peak, settings_of

    configured = settings_of(cfg.memory)
    limit = device_memory_gb * GiB
    tried = []
    candidates = [configured, *[c for c in CANDIDATES if c != configured]]
    for settings in dict.fromkeys(candidates):  # in order, each once
        weights = weights_of(settings)
        total = peak({**weights.device, **other}, weights.encoding)
        if total <= limit:
            return settings, settings != configured, weights
        tried.append((total, settings, {**weights.device, **other}))
    total, settings, memory = min(tried, key=lambda x: x[0])
    worst = max(memory, key=memory.get)
    raise RenderPlanError(f"does not fit: {total / GiB:.1f} GiB per rank needed, {device_memory_gb:g} GiB available "
                          f"even with memory: {settings.describe()} (largest: {worst} {memory[worst] / GiB:.1f} GiB); "
                          f"use more ranks, fewer frames or a smaller size")


def text_work(cfg: RenderConfig, num_frames: int, shards, use_cfg: bool) -> tuple[int, int]:
    """(text-encoder passes, cross-attention text K/V projections per step) of the busiest rank: one prompt (and a
    negative one under guidance) for a plain render; a storyboard's texts and runs of its own frames. Under
    cfg_degree 2 a rank runs one side of guidance per step, but encodes both (as a plain render does). `use_cfg`: the
    render runs an unconditional pass (the family's rule, Family.classifier_free)."""
    split = use_cfg and cfg.parallel.cfg_degree == 2
    if cfg.storyboard is None:
        return 1 + use_cfg, 1 if split else 1 + use_cfg
    from .storyboard import storyboard_of, text_plan

    board = storyboard_of(cfg)
    plans = [text_plan(board, num_frames, cfg.video.fps, r, cfg.sampling.negative_prompt, use_cfg)
             for r in shards.ranges]
    sides = [[len(p.cond.runs)] + ([len(p.uncond.runs)] if p.uncond is not None else []) for p in plans]
    return max(p.encodings for p in plans), max(max(s) if split else sum(s) for s in sides)


def frame_table_bytes(latent_frames: int, kinds: int) -> float:
    """Every rank plans each layer kind on the host: offsets, tiers and a natural-offset table, Long[F, F]
    (the planner's memory line and preflight's host-memory check, freeloc_dist.preflight)."""
    return 3.0 * 8 * latent_frames * latent_frames * kinds


def _si(x: float, unit: str) -> str:
    for scale, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _settings_lines(p: RenderPlan) -> list[str]:
    if p.memory_settings is None:
        return []
    line = f"memory settings: {p.memory_settings.describe(p.experts == 2)}"
    if p.settings_chosen:
        line += (" (chosen to fit: the configured ones do not; set them under memory: or with --text-encoder, "
                 "--experts, --shard-weights)")
    return [line]


def format_plan(p: RenderPlan) -> str:
    from freeloc_dist.progress import format_seconds

    lines = [
        f"plan: world {p.world_size} = cfg {p.cfg_degree} x sp {p.sp_degree}; {p.latent_frames} latent frames x "
        f"{p.tokens_per_frame} tokens = {p.tokens:,} tokens ({p.tokens_per_rank:,} on the largest rank)",
        "layers: " + ", ".join(f"{k} {c} (density {p.density_by_kind[k]:.3f}, {p.strategy_by_kind[k]})"
                                for k, c in p.layers_by_kind.items()),
        *_settings_lines(p),
        "memory per rank:",
        *[f"  {name:<24}{v / GiB:9.2f} GiB" for name, v in p.memory_bytes.items()],
        *([f"  {'text encoder':<24}{p.encoding_bytes / GiB:9.2f} GiB while encoding, then freed"]
          if p.encoding_bytes else []),
        f"  {'total':<24}{p.memory_total / GiB:9.2f} GiB of {p.device_memory_gb:g} GiB (peak)",
        *(["host memory the settings add per rank: " + ", ".join(f"{k} {v / GiB:.2f} GiB"
                                                                  for k, v in p.host_bytes.items())]
          if p.host_bytes else []),
        "compute per rank per step:",
        *[f"  attention {k:<14}{_si(v, 'FLOP'):>14}" for k, v in p.attention_flops_by_kind.items()],
        f"  {'attention (all kinds)':<24}{_si(sum(p.attention_flops_by_kind.values()), 'FLOP'):>14}",
        f"  {'linear + cross-attn':<24}{_si(p.linear_flops, 'FLOP'):>14}"
        + (f" (text K/V for {p.text_runs} runs of frames)" if p.text_runs > 2 else ""),
        f"text encoder: {p.text_encodings} prompt encodings on the busiest rank, {_si(p.text_encoder_flops, 'FLOP')}"
        " once per render",
        "bytes received per rank per step:" + ("" if p.bytes_per_step else " none (one rank)"),
        *[f"  {k:<24}{_si(v, 'B'):>14}" for k, v in p.bytes_per_step.items()],
        *(["bytes moved once per render: " + ", ".join(f"{k} {_si(v, 'B')}" for k, v in p.bytes_per_job.items())]
          if p.bytes_per_job else []),
        f"time: >= {format_seconds(p.seconds)} for {p.steps} steps at {p.peak_tflops:g} TFLOP/s per rank "
        f"(compute only, at the stated peak; {p.seconds / p.steps:.1f} s/step)",
        f"model: {p.num_layers} attention layers; " + (f"T = {p.trained_frames} latent frames (F/T = "
                                                        f"{p.latent_frames / p.trained_frames:.2f})"
                                                        if p.trained_frames else "stock attention (no profile)"),
    ]
    return "\n".join(lines)
