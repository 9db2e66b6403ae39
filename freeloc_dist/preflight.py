"""Everything a render checks before it loads a weight or joins a process group.

Every rank runs the same checks on the same inputs, so a user error is the same one line `error: ...` and
exit 2 on every rank, and no rank is left waiting for another. The result is a `Preflight`: the validated
config of every job, the profile (loaded once, here, for the whole run), the world size and, for a single
render with --resume, its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from .cli import UserError, first_line
from .config import ConfigError, RenderConfig, frames_for_seconds, load_render_config
from .families.kind import FRAMES_RULE


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunOptions:
    """What a run does besides the config: the launcher's flags that are not config keys."""

    resume: bool = False
    prompts: Path | None = None  # a queue file; outputs under out_dir
    out_dir: Path | None = None
    save_latents: Path | None = None
    dry_run: bool = False
    world_size: int | None = None  # with dry_run: ranks to plan for
    gpu_memory_gb: float = 80.0
    peak_tflops: float = 400.0
    report_comm: bool = False
    quiet: bool = False
    validate_only: bool = False  # every check, then exit 0 (./torchrun.sh runs it before torchrun)


@dataclasses.dataclass(frozen=True)
class Preflight:
    configs: list[RenderConfig]  # one per job ([cfg] for a single render)
    profile: Any  # freeloc_dist.profile.Profile or None
    world_size: int
    resume: Any  # the checkpoint of a single render with --resume (None: start from step 0)
    transformer_config: dict | None  # transformer/config.json (or the planner's built-in copy)
    finished: bool = False  # --resume of a single render whose video exists and has no checkpoint
    kind: Any = None  # freeloc_dist.family.ModelKind of the model directory (None: --dry-run without one)
    profile_2: Any = None  # the low-noise expert's profile (two-expert models with a profile)
    loras: tuple = ()  # model.loras, read and checked (freeloc_dist.loras.Lora), applied after loading


def preflight(config_path: Path, overrides: Mapping[str, Any], options: RunOptions,
              seconds: float | None = None) -> Preflight:
    """Validate a run; raises UserError (one line) on the first problem."""
    world = world_size(options)
    cfg = load_config(config_path, overrides, seconds)
    from .caches import cache_config

    cache_config(cfg.cache, cfg.sampling.steps)  # its settings against the diffusers cache's own checks
    model_dir = Path(cfg.model.path)
    if not options.dry_run:  # the planner needs only the transformer's config (or a built-in copy)
        from .models import check_model_dir

        model_dir = check_model_dir(cfg.model.path)
    profile = load_profile_of(cfg)
    transformer_cfg = transformer_config(cfg, profile, required=options.dry_run)
    if transformer_cfg is not None:
        transformer_cfg = family_checks(cfg, transformer_cfg, world)
    if profile is not None and transformer_cfg is not None:
        num_layers = transformer_cfg.get("num_layers")
        if num_layers is not None and profile.num_layers != num_layers:
            raise UserError(f"profile={str(cfg.profile)!r}: lists {profile.num_layers} layers, "
                            f"the model at {model_dir} has {num_layers}")
    if profile is None and cfg.attention_backend != "sdpa":
        from .cli import log

        log(f"warning: attention_backend={cfg.attention_backend} has no effect without a profile")
    kind, profile_2 = model_kind_checks(cfg, model_dir, profile)
    from .memory import check_memory

    check_memory(cfg, kind.two_experts if kind is not None else None)
    heads = (transformer_cfg or {}).get("num_attention_heads")
    configs = queue_configs(config_path, cfg, overrides, options)
    from .storyboard import with_storyboard

    configs = [with_storyboard(job, model_dir, prompt_flag="prompt" in overrides and options.prompts is None)
               for job in configs]
    cfg = configs[0] if options.prompts is None else cfg
    # per-job frames against the world size and the model's positions
    for_each_job(configs, options, lambda job: (check_world(job, world, heads),
                                                check_length(job, profile, transformer_cfg)))
    resume, finished, loras = None, False, ()
    if not options.dry_run:
        from .models import check_weights_match_config
        from .outputs import check_outputs

        check_outputs(configs, options.save_latents, queue=options.prompts is not None)
        check_weights_match_config(model_dir)
        check_timesteps(cfg, model_dir)
        loras = read_loras_of(cfg, model_dir, kind)
        kinds = layer_kinds(profile, profile_2)
        for_each_job(configs, options, lambda job: check_host_memory(job, kinds))
        if options.resume and options.prompts is None:
            resume = read_checkpoint(cfg, profile, kind, profile_2)
            finished = resume is None and cfg.output.is_file()
    if transformer_cfg is not None:  # after every check: a refused render says its one error line only
        unused_negative_prompt(cfg, transformer_cfg)
    return Preflight(configs, profile, world, resume, transformer_cfg, finished, kind, profile_2, loras)


def unused_negative_prompt(cfg: RenderConfig, transformer_cfg) -> None:
    """A negative prompt with guidance settings that run no unconditional pass is not used (a distilled LoRA's
    guidance 1 on a config that ships one; HunyuanVideo without true CFG): said once, as diffusers' pipelines do
    not."""
    from .cli import log
    from .planner import family_of_config

    if cfg.sampling.negative_prompt and not family_of_config(transformer_cfg).classifier_free(cfg.sampling)[0]:
        log("warning: sampling.negative_prompt is not used: these guidance settings run no unconditional pass "
            f"(guidance_scale={cfg.sampling.guidance_scale:g}, true_cfg_scale={cfg.sampling.true_cfg_scale:g})")


def check_timesteps(cfg: RenderConfig, model_dir: Path) -> None:
    """The render's scheduler finds its step by timestep value: integer timesteps that repeat (many steps on a
    strongly shifted schedule: UniPC from 150 steps at HunyuanVideo's shift 7, 300 at 1.5's 5, 1000 on Wan) make
    it take a step twice and fail at the last one, after the whole render. Built here from the scheduler config
    as the render builds it; no weights."""
    from .family import model_family
    from .sampling import set_family_timesteps
    from .schedulers import build_scheduler

    family, steps = model_family(model_dir), cfg.sampling.steps
    scheduler = build_scheduler(family.load_scheduler(model_dir), cfg.sampling.scheduler, cfg.sampling.shift)
    set_family_timesteps(family, scheduler, steps, "cpu")
    timesteps = scheduler.timesteps.tolist()
    if len(set(timesteps)) < len(timesteps):
        raise UserError(f"sampling.steps={steps}: {type(scheduler).__name__} repeats a timestep at this many steps "
                        f"(shift {cfg.sampling.shift:g}) and cannot step through them (diffusers fails at the last "
                        "step); use fewer steps, or sampling.scheduler: euler")


def for_each_job(configs: list, options: RunOptions, check) -> None:
    """check(job) for every job; in a queue a UserError names the job (its frames come from the prompts file)."""
    for i, job in enumerate(configs):
        try:
            check(job)
        except UserError as e:
            if options.prompts is None:
                raise
            raise UserError(f"{options.prompts}: job {i + 1} ({job.output.name}): {e}") from None


def read_loras_of(cfg: RenderConfig, model_dir: Path, kind) -> tuple:
    """The config's LoRAs read and checked against the model (freeloc_dist.loras); () without any."""
    if not cfg.model.loras:
        return ()
    from .family import model_family
    from .loras import read_loras

    return read_loras(cfg.model, model_family(model_dir), model_dir, kind)


def family_checks(cfg: RenderConfig, transformer_cfg: dict, world: int) -> dict:
    """What the model's family refuses in this render (one line), before any generic check; returns the transformer
    config as the planner reads every family's (num_layers = FreeLOC layers)."""
    from .planner import RenderPlanError, family_of_config

    try:
        family = family_of_config(transformer_cfg)
    except RenderPlanError as e:
        raise UserError(f"model.path={str(cfg.model.path)!r}: {first_line(e)}") from None
    problem = family.check_sampling(cfg)
    if problem is not None:
        raise UserError(problem)
    check_joint_backend(family, cfg.attention_backend)
    return family.planner_config(transformer_cfg)


def check_joint_backend(family, backend: str) -> None:
    """The attention backends of families whose text joins FreeLOC's layers (renders and probes)."""
    if family.joint_text and backend == "flex":
        raise UserError("attention_backend=flex: joint text-video attention (HunyuanVideo) runs on sdpa, sdpa-math "
                        "or reference; not on flex yet")


def model_kind_checks(cfg: RenderConfig, model_dir: Path, profile):
    """The model's kind from its directory (freeloc_dist.family) and every profile against it; returns
    (kind, profile_2). Skipped (kind None) only for a --dry-run on a model directory that is not there; then a
    profile_2 is taken only for a published two-expert model the planner knows (planner.KNOWN_KINDS)."""
    from .family import ModelKindError, check_profile_fits, read_model_kind

    if not (Path(model_dir) / "model_index.json").is_file():
        check_published_profile(cfg, profile)
        if cfg.profile_2 is None:
            return None, None
        from .planner import KNOWN_KINDS

        if profile is None or not KNOWN_KINDS.get(profile.model, {}).get("two_experts"):
            raise UserError(f"profile_2={str(cfg.profile_2)!r}: needs the model directory to know its experts")
        return None, load_profile_of(dataclasses.replace(cfg, profile=cfg.profile_2), key="profile_2")
    try:
        kind = read_model_kind(model_dir)
    except ModelKindError as e:
        raise UserError(f"model.path={str(cfg.model.path)!r}: {first_line(e)}") from None
    if kind.frames_rule != FRAMES_RULE:  # video.frames was checked against the configs' rule: say so, never misread
        raise UserError(f"model.path={str(cfg.model.path)!r}: its VAE counts frames {kind.vae_temporal}k+1, but "
                        f"configs count them {FRAMES_RULE.temporal}k+1 (not supported yet)")
    image_checks(cfg, kind, model_dir)
    check_size_fits(cfg, kind)
    if not kind.two_experts:
        for key, value in (("profile_2", cfg.profile_2), ("sampling.guidance_scale_2", cfg.sampling.guidance_scale_2),
                           ("memory.experts", cfg.memory.experts)):
            if value is not None:
                raise UserError(f"{key}: the model at {model_dir} has one transformer (no second expert)")
    profile_2 = None
    if kind.two_experts and (profile is not None) != (cfg.profile_2 is not None):
        raise UserError(f"profile_2: the model at {model_dir} has two experts; give a profile for each "
                        "(profile and profile_2) or for neither")
    if cfg.profile_2 is not None:
        profile_2 = load_profile_of(dataclasses.replace(cfg, profile=cfg.profile_2), key="profile_2")
    try:
        for key, prof, path in (("profile", profile, cfg.profile), ("profile_2", profile_2, cfg.profile_2)):
            if prof is not None:
                check_profile_fits(kind, prof, f"{key}={str(path)!r}")
    except ModelKindError as e:
        raise UserError(first_line(e)) from None
    return kind, profile_2


def check_published_profile(cfg: RenderConfig, profile) -> None:
    """Without the model directory (a --dry-run), a profile of a published model the planner knows must be made
    for that model's family and, where the family states it (planner.KNOWN_KINDS `trained_frames`), its T."""
    from .planner import KNOWN_KINDS, KNOWN_TRANSFORMERS, family_of_config

    if profile is None or profile.model not in KNOWN_TRANSFORMERS:
        return
    family = family_of_config(KNOWN_TRANSFORMERS[profile.model]).name
    where = f"profile={str(cfg.profile)!r}"
    if profile.family is not None and profile.family != family:
        raise UserError(f"{where}: is a profile for the {profile.family} family, {profile.model} is {family}")
    trained = KNOWN_KINDS.get(profile.model, {}).get("trained_frames")
    if trained is not None and profile.trained_frames != trained:
        raise UserError(f"{where}: trained_frames={profile.trained_frames}, but {profile.model} was trained on "
                        f"{trained} latent frames")


def image_checks(cfg: RenderConfig, kind, model_dir: Path) -> None:
    """Conditioning images against the model (one line each), then each image read (once: its bytes are kept for
    the render), decoded and its fitting to the video size checked (freeloc_dist.images), so a bad file fails
    here on every rank, before any weight loads."""
    from .images import ImageError, check_fit, keep_images, load_image

    if kind.task == "t2v":
        for key, value in (("image", cfg.image), ("last_image", cfg.last_image)):
            if value is not None:
                raise UserError(f"{key}: the model at {model_dir} is text-to-video ({kind.pipeline}); it takes no "
                                "image")
        return
    if kind.task == "ti2v":  # Wan2.2 TI2V-5B: text only, or an image as the clean first frame
        if cfg.last_image is not None:
            raise UserError(f"last_image: the model at {model_dir} ({kind.pipeline}, expand_timesteps) takes one "
                            "image, its first frame, or none")
    elif cfg.image is None:
        raise UserError(f"image: the model at {model_dir} is image-to-video ({kind.pipeline}, in_channels="
                        f"{kind.in_channels}); give its first frame (--image PATH or image: in the config)")
    if cfg.last_image is not None and not kind.first_last_frame:
        raise UserError(f"last_image: the model at {model_dir} is not a first-last-frame model (only Wan2.1 "
                        "FLF2V, whose transformer has pos_embed_seq_len, takes a last image)")
    if kind.first_last_frame and cfg.last_image is None:
        raise UserError(f"last_image: the model at {model_dir} is a first-last-frame model (FLF2V); give its last "
                        "frame too (--last-image PATH or last_image: in the config)")
    if kind.image_tokens and cfg.sampling.max_text_tokens != 512:
        raise UserError(f"sampling.max_text_tokens={cfg.sampling.max_text_tokens}: this model puts "
                        f"{kind.image_tokens} CLIP image tokens before the text and diffusers' Wan attention "
                        "takes the last 512 tokens as text; it must be 512")
    if cfg.video.frames < 2 and cfg.last_image is not None:
        raise UserError(f"video.frames={cfg.video.frames}: a first and a last frame need at least 5 frames")
    try:
        keep_images({"image": cfg.image, "last_image": cfg.last_image})  # read once: every later use takes these
        for key, path in (("image", cfg.image), ("last_image", cfg.last_image)):
            if path is not None:
                check_fit(load_image(path, key).size, cfg.video.height, cfg.video.width, f"{key}={str(path)!r}")
    except ImageError as e:
        raise UserError(first_line(e)) from None


def check_size_fits(cfg: RenderConfig, kind) -> None:
    """Height and width in whole tokens of this model (VAE factor x patch: 16 for Wan2.1, 32 for Wan2.2 TI2V's
    16x VAE), checked here rather than by the sampler after the weights load."""
    for key, value, step in (("video.height", cfg.video.height, kind.tokens_per_pixel_axis[0]),
                             ("video.width", cfg.video.width, kind.tokens_per_pixel_axis[1])):
        if value % step:
            raise UserError(f"{key}={value}: must be a multiple of {step} for this model (its VAE's "
                            f"{kind.vae_spatial}x x the transformer's patch)")


def load_config(config_path: Path, overrides: Mapping[str, Any], seconds: float | None) -> RenderConfig:
    cfg = load_render_config(config_path, overrides)
    if seconds is not None:
        if not (math.isfinite(seconds) and seconds > 0):
            raise UserError(f"--seconds={seconds}: must be a positive number")
        try:
            frames = frames_for_seconds(seconds, cfg.video.fps)
        except ValueError as e:
            raise UserError(f"--seconds={seconds}: {e}") from None
        cfg = load_render_config(config_path, {**overrides, "video.frames": frames})
    return cfg


def check_length(cfg: RenderConfig, profile, transformer_cfg: dict | None) -> None:
    """Stock Wan (no profile) has RoPE positions for rope_max_seq_len latent frames (1024): past them its
    tables end and diffusers fails. With FreeLOC every temporal offset stays within the trained range and the
    tables grow to any length (the family's grow_rope), so only stock renders are bounded here."""
    if profile is not None or transformer_cfg is None:
        return
    limit = int(transformer_cfg.get("rope_max_seq_len", 1024))
    if cfg.latent_frames > limit:
        raise UserError(f"video.frames={cfg.video.frames}: {cfg.latent_frames} latent frames, but stock Wan "
                        f"attention has RoPE positions for {limit} (rope_max_seq_len); render it with a "
                        f"FreeLOC profile, or at most {FRAMES_RULE.frames(limit)} frames")


def latent_shape(cfg: RenderConfig) -> tuple[int, int, int, int, int] | None:
    """[1, C, F, H, W] of the render's latents from vae/config.json (None if it cannot be read)."""
    path = Path(cfg.model.path) / "vae" / "config.json"
    if not path.is_file():
        return None
    vae = read_json(path)
    try:
        spatial = int(vae.get("scale_factor_spatial") or 2 ** (len(vae["dim_mult"]) - 1))
        channels = int(vae["z_dim"])
    except (KeyError, TypeError, ValueError):
        return None
    return (1, channels, cfg.latent_frames, cfg.video.height // spatial, cfg.video.width // spatial)


def layer_kinds(*profiles) -> int:
    """The distinct layer kinds the render plans frame tables for (the planner's count; stock: one, "full")."""
    specs = {p.layer_spec(i) for p in profiles if p is not None for i in range(p.num_layers)}
    return max(1, len(specs))


def check_host_memory(cfg: RenderConfig, kinds: int = 1) -> None:
    """The latents live on the host in float32 on every rank (latents, prediction, scheduler history, noise:
    about 5 copies), and every rank plans each of the `kinds` layer kinds in Long[F, F] frame tables (the
    planner's "frame tables (host)", which --dry-run refuses past the device memory); a video whose latents and
    tables alone cannot fit is refused now, not as a crash after loading."""
    from .planner import frame_table_bytes

    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if total <= 0:
        return
    tables = frame_table_bytes(cfg.latent_frames, kinds)
    if tables > total:
        raise UserError(f"video: {cfg.video.frames} frames ({cfg.latent_frames} latent): the frame tables of "
                        f"{kinds} layer kind(s) need {tables / 2**30:.1f} GiB of host memory per rank, this machine "
                        f"has {total / 2**30:.1f} GiB; use fewer frames")
    shape = latent_shape(cfg)
    if shape is None:
        return
    need = math.prod(shape) * 4 * 5 + tables
    what = "the latents and frame tables alone need"
    if cfg.image is not None:  # the float32 pixel video the VAE encodes into the conditioning (conditioning.py)
        need += 3 * 4 * cfg.video.frames * cfg.video.height * cfg.video.width
        what = "the latents, frame tables and the conditioning video need"
    if need > total:
        raise UserError(f"video: {cfg.video.frames} frames at {cfg.video.width}x{cfg.video.height}: {what} "
                        f"{need / 2**30:.1f} GiB of memory, this machine has {total / 2**30:.1f} GiB")


def load_profile_of(cfg: RenderConfig, key: str = "profile"):
    """The config's FreeLOC profile, parsed and validated (None: stock attention)."""
    if cfg.profile is None:
        return None
    from .profile import load_profile

    if not cfg.profile.is_file():
        raise UserError(f"{key}={str(cfg.profile)!r}: profile file not found")
    try:
        return load_profile(cfg.profile)
    except ValueError as e:
        raise UserError(first_line(e)) from None


def transformer_config(cfg: RenderConfig, profile, *, required: bool) -> dict | None:
    """transformer/config.json of the model; else the planner's built-in copy for a published model the
    profile names; else None (or a UserError when `required`, as for --dry-run)."""
    path = Path(cfg.model.path) / "transformer" / "config.json"
    if path.is_file():
        return read_json(path)
    from .planner import KNOWN_TRANSFORMERS

    if profile is not None and profile.model in KNOWN_TRANSFORMERS:
        return dict(KNOWN_TRANSFORMERS[profile.model])
    if required:
        raise UserError(f"model.path={str(cfg.model.path)!r}: missing transformer/config.json")
    return None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def world_size(options: RunOptions) -> int:
    if (options.dry_run or options.validate_only) and options.world_size is not None:
        if options.world_size < 1:
            raise UserError(f"--world-size={options.world_size}: must be >= 1")
        return options.world_size
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world!r}: must be a positive integer")
    return int(world)


def check_world(cfg: RenderConfig, world: int, heads: int | None) -> None:
    """World size against the config, the video and the model's heads (parallel.decisions.check_world)."""
    from .parallel.decisions import check_world as decide

    try:
        decide(world, cfg_degree=cfg.parallel.cfg_degree, latent_frames=cfg.latent_frames,
               strategy=cfg.parallel.strategy, heads=heads, guidance_scale=cfg.sampling.guidance_scale)
    except ValueError as e:
        raise UserError(first_line(e)) from None


def queue_configs(config_path: Path, cfg: RenderConfig, overrides: Mapping[str, Any], options: RunOptions) -> list:
    """One validated RenderConfig per job of the prompts file (or [cfg] for a single render)."""
    if options.prompts is None:
        return [cfg]
    from .queue import QueueError, parse_prompts

    out_dir = options.out_dir if options.out_dir is not None else cfg.output.parent
    try:
        jobs = parse_prompts(options.prompts, out_dir, cfg.sampling.seed)
    except QueueError as e:
        raise UserError(str(e)) from None
    base = {**overrides, "video.frames": cfg.video.frames}  # --seconds already resolved
    configs = []
    for job in jobs:
        over = {**base, "prompt": job.prompt, "output": str(job.output),
                "storyboard": str(job.storyboard) if job.storyboard is not None else None}
        if job.seed is not None:
            over["sampling.seed"] = job.seed
        if job.frames is not None:
            over["video.frames"] = job.frames
        try:
            configs.append(load_render_config(config_path, over))
        except ConfigError as e:
            raise UserError(f"{options.prompts}:{job.line}: {e}") from None
    return configs


def read_checkpoint(cfg: RenderConfig, profile, kind=None, profile_2=None):
    """The checkpoint of this render if it exists (None otherwise); a bad one is a UserError. `kind`,
    `profile_2`: a two-expert model's second profile and boundary are part of the fingerprint."""
    from .checkpoint import CheckpointError, checkpoint_path, expert_key, fingerprint_settings, load_checkpoint
    from .checkpoint import fingerprint as digest

    path = checkpoint_path(cfg)
    if path.is_dir():
        raise UserError(f"checkpoint {path}: is a directory")
    if not path.is_file():
        return None
    experts = expert_key(kind is not None and kind.two_experts, kind.boundary_ratio if kind else None, profile_2)
    settings = fingerprint_settings(cfg, profile, **experts)
    try:
        ckpt = load_checkpoint(path, digest(cfg, profile, **experts), settings, latent_shape=latent_shape(cfg))
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if ckpt.total_steps != cfg.sampling.steps:
        raise UserError(f"checkpoint {path}: has {ckpt.total_steps} steps, sampling.steps is {cfg.sampling.steps}")
    return ckpt
