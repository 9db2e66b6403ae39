"""The sampling loop of a Wan text-to-video render: prompt encoding, flow-matching denoising with
classifier-free guidance, and VAE decoding to uint8 frames.

The loop holds the *global* latents of the whole video. The only place the transformer is called is
`predict_noise(transformer, latents, t, cond, uncond, guidance)`; `sample` takes it as a parameter so that a
sequence-parallel engine can pass its own (sharded, CFG-parallel) implementation with the same contract:
global latents in, guided flow prediction (float32, same shape) out.

Shapes (legend): B batch (always 1 here), C latent channels (vae z_dim), F latent frames, H/W latent height
and width (pixels / vae spatial factor), L text tokens, D text width, V video frames.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from freeloc_dist.caches import step_context
from freeloc_dist.config import RenderConfig
from freeloc_dist.decode import decode_video
from freeloc_dist.guidance import combine, runs_uncond
from freeloc_dist.schedulers import build_scheduler, scheduler_for_render  # noqa: F401  (probing's)

PredictFn = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], torch.Tensor]
StepCallback = Callable[[int, int, float], None]  # (step done, total steps, seconds since start)
AfterStep = Callable[[int, torch.Tensor, Any], None]  # (steps done, latents, scheduler)
NoiseFn = Callable[["LatentGeometry", int, Any], torch.Tensor]  # (geometry, seed, device) -> [B, C, F, H, W]


@dataclass(frozen=True)
class LatentGeometry:
    channels: int  # C
    frames: int  # F
    height: int  # H (latent cells)
    width: int  # W (latent cells)

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (1, self.channels, self.frames, self.height, self.width)


def latent_geometry(vae, transformer, frames: int, height: int, width: int) -> LatentGeometry:
    from freeloc_dist.families import family_of

    family = family_of(transformer)
    temporal, spatial = family.vae_scale_factors(vae)
    _, patch_h, patch_w = family.patch_size(transformer)
    if (frames - 1) % temporal:
        raise ValueError(f"frames={frames} must be {temporal}k+1 for this VAE")
    if height % (spatial * patch_h) or width % (spatial * patch_w):
        raise ValueError(f"height/width {height}x{width} must be multiples of {spatial * patch_h}x{spatial * patch_w}")
    return LatentGeometry(family.latent_channels(vae), (frames - 1) // temporal + 1, height // spatial,
                          width // spatial)


def initial_noise(geometry: LatentGeometry, seed: int, device: torch.device | str) -> torch.Tensor:
    """Gaussian noise [B, C, F, H, W] for the whole video, drawn on CPU in float32 so it is the same on any
    device and any number of ranks (a sequence-parallel rank slices this tensor)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(geometry.shape, generator=gen, dtype=torch.float32).to(device)


def encode_prompt(components, prompt: str, max_tokens: int) -> torch.Tensor:
    """Text states [1, L=max_tokens, D] of `prompt`, as the model's family encodes it (zeros past its length)."""
    from freeloc_dist.families import family_of

    return family_of(components.transformer).encode_prompt(components, prompt, max_tokens)


def encode_prompts(components, prompts: list[str], max_tokens: int) -> list[torch.Tensor]:
    """Text states of each prompt, where the text encoder is (freeloc_dist.memory.PromptEncoder places it)."""
    return [encode_prompt(components, p, max_tokens) for p in prompts]


def batch_timestep(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The transformer's timestep argument: a step's scalar t as [B], or per-token timesteps [B, L] as they are."""
    if t.ndim == 2:
        return t.to(x.device)
    return t.reshape(1).expand(x.shape[0]).to(x.device)


def transformer_inputs(dtype: torch.dtype, latents: torch.Tensor, t: torch.Tensor, condition=None):
    """(hidden_states, timestep, extra kwargs) of a transformer call on latents [B, C, F, H, W] at t (a scalar,
    or per-token [B, L]): the conditioning channels appended and its image tokens passed (image-to-video)."""
    x = latents.to(dtype)
    extra = {}
    if condition is not None:
        x, extra = condition.input_for(x), condition.transformer_kwargs()
    return x, batch_timestep(t, x), extra  # timestep [B], or [B, L] per token (Wan2.2 TI2V)


def predict_noise(transformer, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                  uncond: torch.Tensor | None, guidance: float, *, condition=None) -> torch.Tensor:
    """Guided flow prediction for latents [B, C, F, H, W] at timestep t (a scalar, or per-token timesteps
    [B, L=F h w] in frame-major token order for expand_timesteps models); float32, same shape.

    Without a negative embedding (`uncond` None: the render's first guidance scale is <= 1) only the conditional
    pass runs; with one, both run and combine with `guidance` whatever its value (a second expert's scale may be
    <= 1: diffusers' rule, freeloc_dist.guidance). `condition`
    (freeloc_dist.families.wan.conditioning.Conditioning, image-to-video): its channels join the input and its image
    tokens go to both passes; predict functions that take no image are called without it.
    """
    from freeloc_dist.families import family_of

    text_kwargs = family_of(transformer).text_kwargs  # the family's text conditioning as transformer arguments
    x, timestep, extra = transformer_inputs(transformer.dtype, latents, t, condition)
    pos = transformer(hidden_states=x, timestep=timestep, return_dict=False, **text_kwargs(cond), **extra)[0]
    if not runs_uncond(uncond):
        return pos.float()
    neg = transformer(hidden_states=x, timestep=timestep, return_dict=False, **text_kwargs(uncond), **extra)[0]
    return combine(pos, neg, guidance)


def set_timesteps(transformer, scheduler, steps: int, device) -> None:
    """Set `scheduler` to the timesteps the family's pipeline runs for `steps` steps (its own sigmas, if any)."""
    from freeloc_dist.families import family_of

    set_family_timesteps(family_of(transformer), scheduler, steps, device)


def set_family_timesteps(family, scheduler, steps: int, device) -> None:
    """set_timesteps by the model's family (preflight has no transformer: freeloc_dist.preflight.check_timesteps)."""
    sigmas = family.sampling_sigmas(steps)  # None: the scheduler's own spacing
    if sigmas is None:
        scheduler.set_timesteps(steps, device=device)
    else:
        scheduler.set_timesteps(sigmas=sigmas, device=device)


@torch.inference_mode()
def sample(transformer, scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
           steps: int, guidance: float, predict: PredictFn = predict_noise,
           on_step: StepCallback | None = None, start_step: int = 0, scheduler_state: dict | None = None,
           after_step: AfterStep | None = None, experts=None, condition=None,
           token_timesteps=None) -> torch.Tensor:
    """Denoise `latents` [B, C, F, H, W] (float32) over `steps` scheduler steps; returns the final latents.

    Resuming: `latents` are those after `start_step` steps and `scheduler_state` the scheduler's state then
    (freeloc_dist.checkpoint); the remaining steps give the same result as an uninterrupted loop.
    `after_step(step, latents, scheduler)` runs after every step (checkpointing, preemption); it may raise
    to stop the loop. `experts` (freeloc_dist.experts.ExpertSchedule): which transformer, predict and
    guidance each step uses (two-expert models); None: `transformer`, `predict` and `guidance` throughout.
    `condition`: the image conditioning of the whole video (image-to-video), passed to every predict.
    `token_timesteps` (freeloc_dist.families.wan.token_timesteps.TokenTimesteps, Wan2.2 TI2V): `predict` gets per-token
    timesteps and, in image mode, latents whose frame 0 is the clean conditioning latent, which the returned
    latents also carry; the scheduler's own latents (and checkpoints) stay unblended, as in diffusers."""
    set_timesteps(transformer, scheduler, steps, latents.device)
    if scheduler_state is not None:
        from freeloc_dist.checkpoint import load_scheduler_state

        load_scheduler_state(scheduler, scheduler_state, latents.device)
    timesteps = scheduler.timesteps
    start = time.perf_counter()
    for i in range(start_step, len(timesteps)):
        t = timesteps[i]
        model, step_predict, step_guidance = transformer, predict, guidance
        if experts is not None:
            e = experts.at(t)
            model, step_predict, step_guidance = e.transformer, e.predict, e.guidance
        extra = {} if condition is None else {"condition": condition}
        # the model gets a float timestep: UniPC's are integers, which HunyuanVideo 1.5's time embedder cannot take
        # (its pipeline casts them; Wan's embedder casts them itself, so its input is the same number)
        x, t_in = latents, (t if t.is_floating_point() else t.float())
        if token_timesteps is not None:
            x, t_in = token_timesteps.model_input(latents), token_timesteps.timestep(t)  # t_in [1, L]
        with step_context(model, scheduler, i, cond):  # what diffusers' caches read (freeloc_dist.caches)
            flow = step_predict(model, x, t_in, cond, uncond, step_guidance, **extra)  # [B, C, F, H, W] float32
        latents = scheduler.step(flow, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, len(timesteps), time.perf_counter() - start)
        if after_step is not None:
            after_step(i + 1, latents, scheduler)
    return latents if token_timesteps is None else token_timesteps.finish(latents)


@dataclass
class RenderResult:
    latents: torch.Tensor  # [1, C, F, H, W] float32, final (normalised) latents
    frames: np.ndarray | None  # uint8 [V, Hp, Wp, 3], None if not decoded


def render(components, cfg: RenderConfig, *, decode: bool = True, predict: PredictFn = predict_noise,
           on_step: StepCallback | None = None, noise: NoiseFn = initial_noise, resume=None,
           after_step: AfterStep | None = None, predict_2: PredictFn | None = None,
           image: torch.Tensor | None = None, encode_prompts=encode_prompts,
           own_frames: tuple[int, int] | None = None) -> RenderResult:
    """Run one text-to-video render of `cfg` with loaded components (see freeloc_dist.models).

    `noise(geometry, seed, device)` draws the initial latents (FreeNoise replaces it, freeloc_dist.methods).
    `resume`: a freeloc_dist.checkpoint.Checkpoint of this render to continue from; `after_step` as in
    `sample`. `predict_2`: the second expert's predict (two-expert models; default `predict`).
    `image`: Wan2.2 TI2V's image mode, the conditioning image [1, 3, Hp, Wp] in [-1, 1] at the render size
    (frame 0 becomes its clean latent, with timestep 0); None renders text only. `encode_prompts(components,
    prompts, max_tokens)`: the prompts' text states (freeloc_dist.memory.PromptEncoder under `memory:`).

    `own_frames`: the latent frames [first, end) this rank's predictions run (sequence parallelism): a storyboard
    (cfg.storyboard) encodes the texts of those frames only; None: every frame."""
    from freeloc_dist.experts import expert_schedule

    transformer = components.transformer
    device = next(transformer.parameters()).device
    s = cfg.sampling
    geometry = latent_geometry(components.vae, transformer, cfg.video.frames, cfg.video.height, cfg.video.width)
    from freeloc_dist.families import family_of

    # Wan: the first scale decides, for both experts (diffusers' rule); HunyuanVideo: true_cfg_scale > 1
    use_cfg, cfg_scale = family_of(transformer).classifier_free(s)
    if cfg.storyboard is not None:  # per-frame texts (freeloc_dist.storyboard)
        from freeloc_dist.storyboard import render_texts

        cond, uncond = render_texts(components, cfg, geometry.frames, own_frames, use_cfg, encode_prompts)
    else:
        cond, *negative = encode_prompts(components, [cfg.prompt] + ([s.negative_prompt] if use_cfg else []),
                                         s.max_text_tokens)
        uncond = negative[0] if negative else None
    cond = cond.to(device=device, dtype=transformer.dtype)
    uncond = uncond.to(device=device, dtype=transformer.dtype) if uncond is not None else None
    scheduler = build_scheduler(components.scheduler, s.scheduler, s.shift)
    start_step, state = 0, None
    if resume is not None:
        if tuple(resume.latents.shape) != geometry.shape or resume.total_steps != s.steps:
            raise ValueError(f"checkpoint latents {tuple(resume.latents.shape)} / {resume.total_steps} steps do "
                             f"not match this render ({geometry.shape}, {s.steps} steps)")
        latents = resume.latents.to(device=device, dtype=torch.float32)
        start_step, state = resume.step, resume.scheduler
        torch.set_rng_state(resume.rng)
    else:
        latents = noise(geometry, s.seed, device)
    experts = expert_schedule(components, scheduler, cfg_scale, s.guidance_scale_2, predict, predict_2)
    # image-to-video conditioning of the whole video (TSA sinks on its frames) and per-token timesteps
    condition, per_token = family_of(transformer).render_inputs(components, cfg, geometry, image, device,
                                                                transformer.dtype)
    from freeloc_dist.storyboard import frame_text_attention

    with frame_text_attention(components, enabled=cfg.storyboard is not None):
        latents = sample(transformer, scheduler, latents, cond, uncond, steps=s.steps, guidance=cfg_scale,
                         predict=predict, on_step=on_step, start_step=start_step, scheduler_state=state,
                         after_step=after_step, experts=experts, condition=condition, token_timesteps=per_token)
    frames = decode_video(components.vae, latents) if decode else None
    return RenderResult(latents=latents, frames=frames)
