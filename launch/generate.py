"""Render one text-to-video clip with Wan2.1 (+ FreeLOC when the config names a profile).

    python launch/generate.py --config configs/tiny.yaml [--prompt TEXT] [--frames N | --seconds S]
        [--seed N] [--out PATH] [--save-latents PATH] [--steps N] [--height H] [--width W]
        [--backend sdpa|flex] [--profile PATH|none]

Under torchrun every rank runs this script: world = cfg_degree x sp_degree (config `parallel:`), latent
frames are sharded over the sp ranks, and rank 0 writes the outputs. Order of work: parse flags, validate
the whole config and every input file (model layout, profile, world size vs frames) on every rank before
loading any weights or joining a process group, then load, render, decode, write. Every user error is one
line `error: ...` on stderr and exit code 2, identical on every rank. Paths given on the command line are
relative to the working directory; paths inside a config file are relative to the repository root.

Production flags (README "Production rendering"): --resume / --checkpoint-every K (checkpoints; SIGTERM or
SIGUSR1 writes one and exits 75), --prompts FILE (a queue; outputs under --out-dir), --dry-run (the
planner: tokens, memory, FLOPs, bytes, time; no weights loaded), --quiet. Exit codes: freeloc_dist.cli.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing the package

from freeloc_dist.cli import (  # noqa: E402  (after the sys.path line above)
    EXIT_FAILED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    OneLineParser,
    Preempted,
    UserError,
    first_line,
    main_with_exit_codes,
    rank_prefix,
)

__all__ = ["main", "run", "UserError", "EXIT_USAGE", "EXIT_PREEMPTED", "EXIT_FAILED"]


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(description="Render a text-to-video clip with Wan2.1 and FreeLOC.")
    p.add_argument("--config", required=True, type=Path, help="render config YAML (e.g. configs/tiny.yaml)")
    p.add_argument("--prompt", help="text prompt (default: the config's)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--frames", type=int, help="output video frames, 4k+1 (e.g. 81, 161, 321)")
    length.add_argument("--seconds", type=float, help="video length in seconds (nearest 4k+1 frames at the fps)")
    p.add_argument("--seed", type=int, help="noise seed")
    p.add_argument("--out", type=Path, help="output mp4 path")
    p.add_argument("--save-latents", type=Path, help="also write the final latents (safetensors, key 'latents')")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--height", type=int, help="video height in pixels (multiple of 16)")
    p.add_argument("--width", type=int, help="video width in pixels (multiple of 16)")
    p.add_argument("--backend", choices=["sdpa", "flex"], help="FreeLOC attention backend")
    p.add_argument("--profile", help="FreeLOC profile YAML, or 'none' for stock attention")
    p.add_argument("--compile", choices=["none", "blocks", "full"], help="torch.compile the transformer")
    p.add_argument("--cfg-degree", type=int, choices=[1, 2], help="2: CFG passes on two rank groups")
    p.add_argument("--strategy", choices=["auto", "ulysses", "ring", "hybrid", "neighbour"],
                   help="sequence-parallel attention strategy (default auto: cheapest by bytes)")
    p.add_argument("--report-comm", action="store_true", help="print bytes per rank per layer kind per step")
    prod = p.add_argument_group("production")
    prod.add_argument("--resume", action="store_true",
                      help="continue from the render's checkpoint if there is one (else start from scratch)")
    prod.add_argument("--checkpoint-every", type=int, metavar="K", help="write a checkpoint every K steps")
    prod.add_argument("--checkpoint", type=Path, metavar="PATH",
                      help="checkpoint file (default: .<output name>.ckpt next to the output)")
    prod.add_argument("--prompts", type=Path, metavar="FILE",
                      help="a queue: one prompt per line, or JSON lines {prompt, seed, frames, output}")
    prod.add_argument("--out-dir", type=Path, metavar="DIR",
                      help="with --prompts: output folder (default: the folder of the config's output)")
    prod.add_argument("--dry-run", action="store_true",
                      help="print the plan (tokens, memory, FLOPs, bytes, time) without loading weights")
    prod.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: ranks to plan for")
    prod.add_argument("--gpu-memory-gb", type=float, default=80.0, metavar="GB",
                      help="with --dry-run: memory per device; a plan that does not fit is refused (default 80)")
    prod.add_argument("--peak-tflops", type=float, default=400.0, metavar="T",
                      help="with --dry-run: sustained dense bf16 TFLOP/s per device for the estimate (default 400)")
    prod.add_argument("--quiet", action="store_true", help="errors and the output path only")
    args = p.parse_args(argv)
    if args.prompts is not None:
        for flag in ("out", "save_latents", "checkpoint", "prompt"):
            if getattr(args, flag) is not None:
                raise UserError(f"--{flag.replace('_', '-')}: not allowed with --prompts "
                                f"(each job has its own; use --out-dir)")
    elif args.out_dir is not None:
        raise UserError("--out-dir: only with --prompts (use --out for one render)")
    if args.checkpoint_every is not None and args.checkpoint_every < 0:
        raise UserError(f"--checkpoint-every={args.checkpoint_every}: must be >= 0")
    if args.world_size is not None and not args.dry_run:
        raise UserError("--world-size: only with --dry-run (torchrun sets the world size)")
    for flag in ("gpu_memory_gb", "peak_tflops"):
        v = getattr(args, flag)
        if not (math.isfinite(v) and v > 0):
            raise UserError(f"--{flag.replace('_', '-')}={v}: must be a positive number")
    return args


def _overrides(args: argparse.Namespace) -> dict:
    cwd = Path.cwd()
    out = {}
    for flag, key in [("prompt", "prompt"), ("seed", "sampling.seed"), ("steps", "sampling.steps"),
                      ("height", "video.height"), ("width", "video.width"), ("frames", "video.frames"),
                      ("backend", "attention_backend"), ("cfg_degree", "parallel.cfg_degree"),
                      ("strategy", "parallel.strategy"), ("checkpoint_every", "checkpoint.every"),
                      ("compile", "model.compile")]:
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    if args.out is not None:
        out["output"] = str(cwd / args.out)
    if args.checkpoint is not None:
        out["checkpoint.path"] = str(cwd / args.checkpoint)
    if args.profile is not None:
        out["profile"] = None if args.profile.lower() == "none" else str(cwd / args.profile)
    return out


def _load_config(args: argparse.Namespace):
    from freeloc_dist.config import frames_for_seconds, load_render_config

    overrides = _overrides(args)
    cfg = load_render_config(args.config, overrides)
    if args.seconds is not None:
        if not (math.isfinite(args.seconds) and args.seconds > 0):
            raise UserError(f"--seconds={args.seconds}: must be a positive number")
        overrides["video.frames"] = frames_for_seconds(args.seconds, cfg.video.fps)
        cfg = load_render_config(args.config, overrides)
    return cfg


def _check_inputs(cfg, args: argparse.Namespace, world: int):
    """Everything that can be checked without loading weights. Returns the parsed profile (or None)."""
    from freeloc_dist.models import check_model_dir

    if args.dry_run:  # the planner needs only the transformer's config (or a built-in copy), no weights
        model_dir = Path(cfg.model.path)
    else:
        model_dir = check_model_dir(cfg.model.path)
    profile = None
    if cfg.profile is not None:
        from freeloc_dist.profile import load_profile

        if not cfg.profile.is_file():
            raise UserError(f"profile={str(cfg.profile)!r}: profile file not found")
        try:
            profile = load_profile(cfg.profile)
        except ValueError as e:
            raise UserError(first_line(e)) from None
        num_layers = _transformer_config(cfg, profile).get("num_layers")
        if num_layers is not None and profile.num_layers != num_layers:
            raise UserError(f"profile={str(cfg.profile)!r}: lists {profile.num_layers} layers, "
                            f"the model at {model_dir} has {num_layers}")
    elif cfg.attention_backend != "sdpa":
        _log(f"warning: attention_backend={cfg.attention_backend} has no effect without a profile")
    _check_world(cfg, world)
    return profile


def _make_folders(configs, args) -> None:
    """The last check: output folders can be made (only after everything else is known to be valid)."""
    for path in [c.output for c in configs] + ([args.save_latents] if args.save_latents else []):
        try:
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder of {path}: {e.strerror}") from None


def _transformer_config(cfg, profile) -> dict:
    """transformer/config.json of the model; for --dry-run, a built-in copy for the published Wan2.1 models."""
    path = Path(cfg.model.path) / "transformer" / "config.json"
    if path.is_file():
        return _read_json(path)
    from freeloc_dist.planner import KNOWN_TRANSFORMERS

    if profile is not None and profile.model in KNOWN_TRANSFORMERS:
        return dict(KNOWN_TRANSFORMERS[profile.model])
    raise UserError(f"model.path={str(cfg.model.path)!r}: missing transformer/config.json")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not readable JSON ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _world_size(args: argparse.Namespace) -> int:
    if args.dry_run and args.world_size is not None:
        if args.world_size < 1:
            raise UserError(f"--world-size={args.world_size}: must be >= 1")
        return args.world_size
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world!r}: must be a positive integer")
    return int(world)


def _check_world(cfg, world: int) -> None:
    """World size against the config and the video, before any process group exists."""
    cfg_degree = cfg.parallel.cfg_degree
    if world % cfg_degree:
        raise UserError(f"parallel.cfg_degree={cfg_degree}: does not divide the world size {world}")
    if cfg_degree == 2 and cfg.sampling.guidance_scale <= 1.0:
        raise UserError("parallel.cfg_degree=2: needs sampling.guidance_scale > 1 (no unconditional pass otherwise)")
    sp = world // cfg_degree
    if sp > cfg.latent_frames:
        raise UserError(f"{world} ranks give {sp} sequence-parallel ranks but the video has only "
                        f"{cfg.latent_frames} latent frames; use more frames or fewer ranks")
    if cfg.parallel.strategy in ("ulysses", "hybrid") and sp > 1:
        path = Path(cfg.model.path) / "transformer" / "config.json"
        heads = _read_json(path).get("num_attention_heads", 0) if path.is_file() else 0
        if not heads:
            return
        if cfg.parallel.strategy == "ulysses" and heads % sp:
            raise UserError(f"parallel.strategy=ulysses: {heads} heads do not divide over {sp} ranks; use auto or ring")
        if cfg.parallel.strategy == "hybrid" and math.gcd(heads, sp) == 1:
            raise UserError(f"parallel.strategy=hybrid: {heads} heads and {sp} ranks share no factor; use auto or ring")


def _queue_configs(cfg, args: argparse.Namespace) -> list:
    """One validated RenderConfig per job of --prompts (or [cfg] for a single render)."""
    if args.prompts is None:
        return [cfg]
    from freeloc_dist.config import ConfigError, load_render_config
    from freeloc_dist.queue import QueueError, parse_prompts

    out_dir = (Path.cwd() / args.out_dir) if args.out_dir is not None else cfg.output.parent
    try:
        jobs = parse_prompts(args.prompts, out_dir, cfg.sampling.seed)
    except QueueError as e:
        raise UserError(str(e)) from None
    base = _overrides(args)
    base["video.frames"] = cfg.video.frames  # --seconds already resolved
    configs = []
    for job in jobs:
        over = {**base, "prompt": job.prompt, "output": str(job.output)}
        if job.seed is not None:
            over["sampling.seed"] = job.seed
        if job.frames is not None:
            over["video.frames"] = job.frames
        try:
            configs.append(load_render_config(args.config, over))
        except ConfigError as e:
            raise UserError(f"{args.prompts}:{job.line}: {e}") from None
    return configs


def _log(message: str) -> None:
    print(f"{rank_prefix()}{message}", file=sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    world = _world_size(args)
    cfg = _load_config(args)
    profile = _check_inputs(cfg, args, world)
    configs = _queue_configs(cfg, args)
    for job_cfg in configs:
        _check_world(job_cfg, world)  # per-job frames against the world size
    if args.dry_run:
        return _dry_run(configs, profile, world, args)
    resume = None
    if args.resume and args.prompts is None:  # a single render: a bad checkpoint is a user error, on every rank
        resume = _read_checkpoint(cfg)
    _make_folders(configs, args)

    # Validation done on every rank: from here on, process groups and heavy work.
    from freeloc_dist.parallel import destroy_parallel, init_parallel

    dims = init_parallel(cfg_degree=cfg.parallel.cfg_degree, timeout_s=cfg.parallel.timeout_s)
    try:
        return _render_all(configs, args, profile, dims, resume)
    finally:
        destroy_parallel(dims)


def _read_checkpoint(cfg):
    """The checkpoint of this render if it exists (None otherwise); a bad one is a UserError."""
    from freeloc_dist.checkpoint import CheckpointError, checkpoint_path, fingerprint, load_checkpoint

    path = checkpoint_path(cfg)
    if not path.is_file():
        return None
    try:
        ckpt = load_checkpoint(path, fingerprint(cfg))
    except CheckpointError as e:
        raise UserError(str(e)) from None
    if ckpt.total_steps != cfg.sampling.steps:
        raise UserError(f"checkpoint {path}: has {ckpt.total_steps} steps, sampling.steps is {cfg.sampling.steps}")
    return ckpt


class _Session:
    """What stays loaded across the jobs of one run: components, FreeLOC, the parallel engine."""

    def __init__(self, cfg, profile, dims, log):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from freeloc_dist.models import load_components
        from freeloc_dist.sampling import predict_noise

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        start = time.perf_counter()
        log(f"loading {cfg.model.path} ({cfg.model.dtype}, {dims.device}, world {dims.world_size} = "
            f"cfg {dims.cfg_degree} x sp {dims.sp_degree})")
        self.parts = load_components(cfg.model.path, cfg.model.dtype, dims.device)
        if profile is not None:
            from freeloc_dist.install import apply_freeloc

            try:
                apply_freeloc(self.parts.transformer, profile, backend=cfg.attention_backend)
            except ValueError as e:
                raise UserError(first_line(e)) from None
            log(f"FreeLOC: {cfg.profile} (trained_frames={profile.trained_frames}, backend={cfg.attention_backend})")
        else:
            log("FreeLOC: off (stock attention)")
        self.predict, self.engine = predict_noise, None
        if dims.world_size > 1:
            from freeloc_dist.parallel import parallelize

            self.engine = parallelize(self.parts.transformer, dims, backend=cfg.attention_backend,
                                      strategy=cfg.parallel.strategy)
            self.predict = self.engine.predict
        compile_transformer(self.parts.transformer, cfg.model.compile, log)
        self.load_s = time.perf_counter() - start

    def any_flag(self, flag: bool) -> bool:
        return self.engine.comm.any_flag(flag) if self.engine is not None else flag


def _render_all(configs, args, profile, dims, resume) -> int:
    from freeloc_dist.checkpoint import PreemptionFlag

    lead = dims.rank == 0
    log = _log if (lead and not args.quiet) else (lambda message: None)
    session = _Session(configs[0], profile, dims, log)
    # From here a preemption signal means "checkpoint at the next step boundary"; before (joining the group,
    # loading weights) there is nothing to save and the signal keeps its default effect.
    with PreemptionFlag() as flag:
        return _run_jobs(configs, args, session, dims, flag, resume, log)


def _run_jobs(configs, args, session, dims, flag, resume, log) -> int:
    lead = dims.rank == 0
    queue = args.prompts is not None
    done, skipped, failed = [], [], []
    for index, cfg in enumerate(configs):
        label = f"[job {index + 1}/{len(configs)}] " if queue else ""
        if queue and cfg.output.exists():  # decided from the filesystem every rank sees, before any collective
            log(f"{label}skip: {cfg.output} exists")
            skipped.append(cfg.output)
            continue
        try:
            job_resume = resume if not queue else (_read_checkpoint(cfg) if args.resume else None)
            out = _render_one(cfg, args, session, dims, flag, job_resume, log, label)
        except Preempted:
            raise
        except Exception as e:
            if not queue:
                raise
            # A job that fails on every rank alike (bad checkpoint, bad frames for the model, a write error on
            # rank 0) is reported and the queue goes on; a failure inside a collective ends the run.
            _log(f"{label}failed: {cfg.prompt[:60]!r}: {type(e).__name__}: {first_line(e)}")
            failed.append(cfg.output)
            continue
        done.append(out)
        if lead:
            print(out, flush=True)
    if queue and lead:
        _log(f"queue: {len(done)} rendered, {len(skipped)} skipped (output exists), {len(failed)} failed"
             + "".join(f"\n  failed: {p}" for p in failed))
    return EXIT_FAILED if failed else 0


def _render_one(cfg, args, session, dims, flag, resume, log, label) -> Path:
    from freeloc_dist.checkpoint import Checkpoint, checkpoint_path, fingerprint, save_checkpoint, scheduler_state
    from freeloc_dist.progress import Progress
    from freeloc_dist.parallel.comm import Comm
    from freeloc_dist.parallel.decode import DecodeStopped, decode_ranges, iter_decode_spread
    from freeloc_dist.sampling import can_decode_ranges, render
    from freeloc_dist.video import save_latents, write_json, write_mp4

    import torch

    lead = dims.rank == 0
    start = time.perf_counter()
    v, s = cfg.video, cfg.sampling
    ckpt_path, key, every = checkpoint_path(cfg), fingerprint(cfg), cfg.checkpoint.every
    log(f"{label}rendering {v.frames} frames ({cfg.latent_frames} latent) at {v.width}x{v.height}, "
        f"{s.steps} steps, seed {s.seed}" + (f", resuming after step {resume.step}" if resume else ""))
    if resume is None and args.resume:
        log(f"{label}no checkpoint at {ckpt_path}: starting from step 0")
    sample_start = time.perf_counter()

    def after_step(step: int, latents, scheduler) -> None:
        stop = session.any_flag(flag.raised is not None)  # one all-reduce per step: every rank stops together
        final = step == s.steps
        if lead and (stop or (every and (step % every == 0 or final))):
            save_checkpoint(ckpt_path, Checkpoint(step=step, total_steps=s.steps, latents=latents,
                                                  scheduler=scheduler_state(scheduler),
                                                  rng=torch.get_rng_state(), fingerprint=key))
        if stop:
            session.any_flag(False)  # a barrier: rank 0 has finished writing before any rank exits
            raise Preempted(step, ckpt_path)

    progress = Progress(log, start_step=resume.step if resume else 0, label=label)
    result = render(session.parts, cfg, decode=False, predict=session.predict, on_step=progress,
                    resume=resume, after_step=after_step)
    sample_s = time.perf_counter() - sample_start
    if args.report_comm:
        _report_comm(session.engine, dims, session.parts.transformer, s.steps)
    if lead and args.save_latents is not None:
        save_latents(args.save_latents, result.latents)
        log(f"latents: {args.save_latents}")
    decode_start = time.perf_counter()
    comm = session.engine.comm if session.engine is not None else Comm(dims)
    stopped = Preempted(s.steps, ckpt_path if every else "none (set --checkpoint-every)")

    def chunks():
        # every rank decodes a range of latent frames; rank 0 receives the others' frames and writes them
        try:
            for chunk in iter_decode_spread(session.parts.vae, result.latents, comm,
                                            stop=lambda: flag.raised is not None):
                if not dims.distributed and flag.raised is not None:  # alone: stop at once
                    raise stopped
                yield chunk
        except DecodeStopped:  # a signal on some rank during decode: every rank stops here together
            raise stopped from None

    if lead:
        write_mp4(cfg.output, chunks(), fps=v.fps)
    else:
        for _ in chunks():
            pass
    decode_s = time.perf_counter() - decode_start
    if not lead:
        return cfg.output
    received = comm.bytes.get("decode", 0)
    ranks = sum(e > s for s, e in decode_ranges(cfg.latent_frames, dims.world_size))
    ranks = ranks if can_decode_ranges(session.parts.vae) else 1
    log(f"{label}decoded on {ranks} rank{'s' if ranks > 1 else ''}"
        f" and written in {decode_s:.1f}s" + (f" ({received / 2**20:.1f} MiB of frames from other ranks)"
                                              if received else ""))
    timings = {"load_s": session.load_s, "sample_s": sample_s, "decode_and_write_s": decode_s,
               "render_s": time.perf_counter() - start,
               "s_per_step": sample_s / max(1, s.steps - (resume.step if resume else 0))}
    write_json(cfg.output.with_suffix(".json"), _sidecar(cfg, dims, resume, timings))
    ckpt_path.unlink(missing_ok=True)
    log(f"{label}done in {timings['render_s']:.1f}s: {cfg.output}")
    return cfg.output


def _sidecar(cfg, dims, resume, timings) -> dict:
    """What a render was: prompt, seed, config, profile, package versions, timings."""
    import dataclasses
    import platform
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    profile = None
    if cfg.profile is not None:
        from freeloc_dist.profile import load_profile

        profile = {"path": str(cfg.profile), **load_profile(cfg.profile).to_mapping()}
    return {
        "prompt": cfg.prompt,
        "seed": cfg.sampling.seed,
        "output": str(cfg.output),
        "config": dataclasses.asdict(cfg),
        "profile": profile,
        "world": {"size": dims.world_size, "cfg_degree": dims.cfg_degree, "sp_degree": dims.sp_degree,
                  "device": str(dims.device)},
        "resumed_from_step": resume.step if resume is not None else None,
        "versions": {"python": platform.python_version(),
                     **{n: version(n) for n in ("freeloc_dist", "torch", "diffusers", "transformers",
                                                "imageio-ffmpeg")}},
        "timings": {k: round(x, 3) for k, x in timings.items()},
    }


def _dry_run(configs, profile, world: int, args) -> int:
    from freeloc_dist.planner import PlanError, format_plan, plan_render

    if os.environ.get("RANK", "0") != "0":
        return 0
    for cfg in configs[:1]:
        transformer_cfg = _transformer_config(cfg, profile)
        te_path = Path(cfg.model.path) / "text_encoder" / "config.json"
        text_encoder_cfg = _read_json(te_path) if te_path.is_file() else None
        try:
            plan = plan_render(cfg, transformer_cfg, profile, world_size=world, text_encoder_cfg=text_encoder_cfg,
                               device_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops)
        except PlanError as e:
            raise UserError(str(e)) from None
        print(format_plan(plan))
    return 0


def compile_transformer(transformer, mode: str, log) -> None:
    """model.compile: after FreeLOC and the engine are installed (their attention is one custom op, so
    both modes trace the whole block; the engine's sharding and gathers stay eager)."""
    from freeloc_dist.compile import compile_transformer as apply

    if apply(transformer, mode):
        log(f"torch.compile: {mode} (compiled on the first step)")


def _report_comm(engine, dims, transformer, steps: int) -> None:
    """Bytes received per rank, per layer kind, per sampling step (and per layer of that kind)."""
    gathered = engine.comm.gather_counts() if engine is not None else [{}]
    if dims.rank != 0:
        return
    state = getattr(transformer, "freeloc_state", None)
    kinds = list(state.profile.kinds) if state is not None else []
    tags = sorted({t for c in gathered for t in c})
    _log(f"communication: bytes received per rank per step ({steps} steps); per layer in parentheses")
    for rank, c in enumerate(gathered):
        cells = []
        for t in tags:
            per_step = c.get(t, 0) / steps
            layers = kinds.count(t)
            cells.append(f"{t}={per_step:,.0f}" + (f" ({per_step / layers:,.0f}/layer)" if layers else ""))
        _log(f"  rank {rank}: " + ("  ".join(cells) if cells else "no communication (single process)"))


def main(argv: list[str] | None = None) -> int:
    return main_with_exit_codes(run, argv)


if __name__ == "__main__":
    sys.exit(main())
