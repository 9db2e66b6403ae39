"""The render runner behind launch/generate.py: one render or a queue of them, on one process or many.

Order of work: `preflight` validates everything on every rank (freeloc_dist.preflight); then process groups
are made once, the components load once (`Session`: weights, FreeLOC, the parallel engine), and each job
samples (checkpointing every K steps and on a preemption signal), decodes over the ranks, and rank 0
writes the mp4 and its JSON sidecar. Exit codes are freeloc_dist.cli's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

from .cli import EXIT_FAILED, Preempted, UserError, first_line, log
from .preflight import Preflight, RunOptions, preflight, read_checkpoint, read_json

__all__ = ["RunOptions", "run"]


def run(config_path: Path, overrides: Mapping[str, Any], options: RunOptions, *, seconds: float | None = None) -> int:
    """Validate, then render every job (or print the plan with options.dry_run); returns the exit code."""
    pre = preflight(config_path, overrides, options, seconds)
    if options.dry_run:
        return dry_run(pre, options)
    from .parallel import destroy_parallel, init_parallel

    first = pre.configs[0]
    dims = init_parallel(cfg_degree=first.parallel.cfg_degree, timeout_s=first.parallel.timeout_s)
    try:
        lead_log = log if (dims.rank == 0 and not options.quiet) else (lambda message: None)
        session = Session(first, pre.profile, dims, lead_log, profile_2=pre.profile_2)
        from .checkpoint import PreemptionFlag

        # From here a preemption signal means "checkpoint at the next step boundary"; before (joining the
        # group, loading weights) there is nothing to save and the signal keeps its default effect.
        with PreemptionFlag() as flag:
            return run_jobs(pre, options, session, flag)
    finally:
        destroy_parallel(dims)


class Session:
    """What stays loaded across the jobs of one run: components, FreeLOC, the parallel engine."""

    def __init__(self, cfg, profile, dims, log_fn, profile_2=None):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from .models import load_components
        from .sampling import predict_noise

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        start = time.perf_counter()
        log_fn(f"loading {cfg.model.path} ({cfg.model.dtype}, {dims.device}, world {dims.world_size} = "
               f"cfg {dims.cfg_degree} x sp {dims.sp_degree})")
        self.dims, self.profile, self.log = dims, profile, log_fn
        self.parts = load_components(cfg.model.path, cfg.model.dtype, dims.device)
        self.profile_2 = profile_2
        # one profile per expert (Wan2.2 A14B: transformer_2 with profile_2; preflight checked both)
        pairs = [(self.parts.transformer, profile, cfg.profile)]
        if self.parts.transformer_2 is not None:
            pairs.append((self.parts.transformer_2, profile_2, cfg.profile_2))
        for model, prof, path in pairs:
            if prof is None:
                log_fn("FreeLOC: off (stock attention)")
                continue
            from .install import apply_freeloc

            try:
                apply_freeloc(model, prof, backend=cfg.attention_backend)
            except ValueError as e:
                raise UserError(first_line(e)) from None
            log_fn(f"FreeLOC: {path} (trained_frames={prof.trained_frames}, backend={cfg.attention_backend})")
        self.predict, self.predict_2, self.engine, self.engine_2 = predict_noise, None, None, None
        if dims.world_size > 1:
            from .parallel import parallelize

            self.engine = parallelize(self.parts.transformer, dims, backend=cfg.attention_backend,
                                      strategy=cfg.parallel.strategy)
            self.predict = self.engine.predict
            if self.parts.transformer_2 is not None:  # its own hooks, the same groups and byte counters
                self.engine_2 = parallelize(self.parts.transformer_2, dims, backend=cfg.attention_backend,
                                            strategy=cfg.parallel.strategy, comm=self.engine.comm)
                self.predict_2 = self.engine_2.predict
        from .parallel.comm import Comm

        self.comm = self.engine.comm if self.engine is not None else Comm(dims)
        self.load_s = time.perf_counter() - start

    def any_flag(self, flag: bool) -> bool:
        return self.comm.any_flag(flag)


def run_jobs(pre: Preflight, options: RunOptions, session: Session, flag) -> int:
    lead, log_fn = session.dims.rank == 0, session.log
    queue = options.prompts is not None
    done, skipped, failed = [], [], []
    for index, cfg in enumerate(pre.configs):
        label = f"[job {index + 1}/{len(pre.configs)}] " if queue else ""
        if queue and cfg.output.exists():  # decided from the filesystem every rank sees, before any collective
            log_fn(f"{label}skip: {cfg.output} exists")
            skipped.append(cfg.output)
            continue
        try:
            job_resume = pre.resume
            if queue:
                job_resume = read_checkpoint(cfg, pre.profile, pre.kind, pre.profile_2) if options.resume else None
            out = render_one(cfg, options, session, flag, job_resume, label)
        except Preempted:
            raise
        except Exception as e:
            if not queue:
                raise
            # A job that fails on every rank alike (bad checkpoint, bad frames for the model, a write error on
            # rank 0) is reported and the queue goes on; a failure inside a collective ends the run.
            log(f"{label}failed: {cfg.prompt[:60]!r}: {type(e).__name__}: {first_line(e)}")
            failed.append(cfg.output)
            continue
        done.append(out)
        if lead:
            print(out, flush=True)
    if queue and lead:
        log(f"queue: {len(done)} rendered, {len(skipped)} skipped (output exists), {len(failed)} failed"
            + "".join(f"\n  failed: {p}" for p in failed))
    return EXIT_FAILED if failed else 0


def render_one(cfg, options: RunOptions, session: Session, flag, resume, label: str) -> Path:
    """Sample (with checkpoints), decode over the ranks, write mp4 + sidecar on rank 0; returns the output."""
    import torch

    from .checkpoint import Checkpoint, checkpoint_path, fingerprint, save_checkpoint, scheduler_state
    from .decode import DecodeStopped, can_decode_ranges, decode_ranges, iter_decode_spread
    from .progress import Progress
    from .sampling import render
    from .video import save_latents, write_json, write_mp4

    dims, log_fn = session.dims, session.log
    lead = dims.rank == 0
    start = time.perf_counter()
    v, s = cfg.video, cfg.sampling
    ckpt_path, every = checkpoint_path(cfg), cfg.checkpoint.every
    key = fingerprint(cfg, session.profile, **expert_key(session.parts, session.profile_2))
    log_fn(f"{label}rendering {v.frames} frames ({cfg.latent_frames} latent) at {v.width}x{v.height}, "
           f"{s.steps} steps, seed {s.seed}" + (f", resuming after step {resume.step}" if resume else ""))
    if resume is None and options.resume:
        log_fn(f"{label}no checkpoint at {ckpt_path}: starting from step 0")
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

    progress = Progress(log_fn, start_step=resume.step if resume else 0, label=label)
    result = render(session.parts, cfg, decode=False, predict=session.predict, on_step=progress,
                    resume=resume, after_step=after_step, predict_2=session.predict_2)
    sample_s = time.perf_counter() - sample_start
    if options.report_comm:
        report_comm(session, s.steps)
    if lead and options.save_latents is not None:
        save_latents(options.save_latents, result.latents)
        log_fn(f"latents: {options.save_latents}")
    decode_start = time.perf_counter()
    stopped = Preempted(s.steps, ckpt_path if every else "none (set --checkpoint-every)")

    def chunks():
        # every rank decodes a range of latent frames; rank 0 receives the others' frames and writes them
        try:
            for chunk in iter_decode_spread(session.parts.vae, result.latents, session.comm,
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
    received = session.comm.bytes.get("decode", 0)
    ranks = sum(e > s for s, e in decode_ranges(cfg.latent_frames, dims.world_size))
    ranks = ranks if can_decode_ranges(session.parts.vae) else 1
    log_fn(f"{label}decoded on {ranks} rank{'s' if ranks > 1 else ''}"
           f" and written in {decode_s:.1f}s" + (f" ({received / 2**20:.1f} MiB of frames from other ranks)"
                                                 if received else ""))
    timings = {"load_s": session.load_s, "sample_s": sample_s, "decode_and_write_s": decode_s,
               "render_s": time.perf_counter() - start,
               "s_per_step": sample_s / max(1, s.steps - (resume.step if resume else 0))}
    write_json(cfg.output.with_suffix(".json"), sidecar(cfg, session, resume, timings))
    ckpt_path.unlink(missing_ok=True)
    log_fn(f"{label}done in {timings['render_s']:.1f}s: {cfg.output}")
    return cfg.output


def expert_key(parts, profile_2) -> dict:
    """What a second expert adds to the checkpoint fingerprint: its profile and the switch point."""
    if parts.transformer_2 is None:
        return {}
    return {"profile_2": profile_2, "boundary_ratio": parts.boundary_ratio}


def sidecar(cfg, session: Session, resume, timings) -> dict:
    """What a render was: prompt, seed, config, profile, package versions, timings."""
    import platform
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    dims, profile = session.dims, session.profile
    return {
        "prompt": cfg.prompt,
        "seed": cfg.sampling.seed,
        "output": str(cfg.output),
        "config": dataclasses.asdict(cfg),
        "profile": {"path": str(cfg.profile), **profile.to_mapping()} if profile is not None else None,
        "world": {"size": dims.world_size, "cfg_degree": dims.cfg_degree, "sp_degree": dims.sp_degree,
                  "device": str(dims.device)},
        "resumed_from_step": resume.step if resume is not None else None,
        "versions": {"python": platform.python_version(),
                     **{n: version(n) for n in ("freeloc_dist", "torch", "diffusers", "transformers",
                                                "imageio-ffmpeg")}},
        "timings": {k: round(x, 3) for k, x in timings.items()},
    }


def dry_run(pre: Preflight, options: RunOptions) -> int:
    """Print the planner's estimate for the first job (rank 0 only); nothing is loaded."""
    from .planner import RenderPlanError, format_plan, plan_render

    if os.environ.get("RANK", "0") != "0":
        return 0
    cfg = pre.configs[0]
    te_path = Path(cfg.model.path) / "text_encoder" / "config.json"
    text_encoder_cfg = read_json(te_path) if te_path.is_file() else None
    try:
        plan = plan_render(cfg, pre.transformer_config, pre.profile, world_size=pre.world_size,
                           text_encoder_cfg=text_encoder_cfg, device_memory_gb=options.gpu_memory_gb,
                           peak_tflops=options.peak_tflops, model_kind=pre.kind)
    except RenderPlanError as e:
        raise UserError(str(e)) from None
    print(format_plan(plan))
    return 0


def report_comm(session: Session, steps: int) -> None:
    """Bytes received per rank, per layer kind, per sampling step (and per layer of that kind)."""
    gathered = session.engine.comm.gather_counts() if session.engine is not None else [{}]
    if session.dims.rank != 0:
        return
    state = getattr(session.parts.transformer, "freeloc_state", None)
    kinds = list(state.profile.kinds) if state is not None else []
    tags = sorted({t for c in gathered for t in c})
    log(f"communication: bytes received per rank per step ({steps} steps); per layer in parentheses")
    for rank, c in enumerate(gathered):
        cells = []
        for t in tags:
            per_step = c.get(t, 0) / steps
            layers = kinds.count(t)
            cells.append(f"{t}={per_step:,.0f}" + (f" ({per_step / layers:,.0f}/layer)" if layers else ""))
        log(f"  rank {rank}: " + ("  ".join(cells) if cells else "no communication (single process)"))
