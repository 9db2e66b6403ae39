"""The render runner behind launch/generate.py: one render or a queue of them, on one process or many.

Order of work: `preflight` validates everything on every rank (freeloc_dist.preflight); then process groups
are made once, the components load once (`Session`: weights, FreeLOC, the parallel engine), and each job
samples (checkpointing every K steps and on a preemption signal), decodes over the ranks, and rank 0
writes the mp4 and its JSON sidecar. Exit codes are freeloc_dist.cli's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Mapping

from .cli import EXIT_FAILED, Preempted, RenderFailed, UserError, first_line, log
from .preflight import Preflight, RunOptions, preflight, read_checkpoint, read_json

__all__ = ["RunOptions", "run"]


def run(config_path: Path, overrides: Mapping[str, Any], options: RunOptions, *, seconds: float | None = None) -> int:
    """Validate, then render every job (or print the plan with options.dry_run); returns the exit code."""
    pre = preflight(config_path, overrides, options, seconds)
    if options.validate_only:
        return 0
    if options.dry_run:
        return dry_run(pre, options)
    first = pre.configs[0]
    if pre.finished:  # --resume of a render that completed: nothing to continue
        if os.environ.get("RANK", "0") == "0":
            if not options.quiet:
                log(f"already rendered: {first.output} exists and has no checkpoint (delete it to render again)")
            print(first.output, flush=True)
        return 0
    from .parallel import destroy_parallel, init_parallel

    dims = init_parallel(cfg_degree=first.parallel.cfg_degree, timeout_s=first.parallel.timeout_s)
    try:
        with claim_outputs(pre, options, dims):
            lead_log = log if (dims.rank == 0 and not options.quiet) else (lambda message: None)
            session = Session(first, pre.profile, dims, lead_log, profile_2=pre.profile_2, loras=pre.loras,
                              keep_text_encoder=options.prompts is not None)
            from .checkpoint import PreemptionFlag

            # From here a preemption signal means "checkpoint at the next step boundary"; before (joining the
            # group, loading weights) there is nothing to save and the signal keeps its default effect.
            with PreemptionFlag() as flag:
                return run_jobs(pre, options, session, flag)
    finally:
        destroy_parallel(dims)


@contextlib.contextmanager
def claim_outputs(pre: Preflight, options: RunOptions, dims):
    """Rank 0 makes the output folders, locks every output and removes a killed render's temporary files
    (freeloc_dist.outputs.OutputClaim); every rank learns whether that worked before any weight loads."""
    from .outputs import OutputClaim
    from .parallel.comm import Comm

    claim, problem = None, None
    if dims.rank == 0:
        try:
            claim = OutputClaim(pre.configs, options.save_latents).__enter__()
        except UserError as e:
            problem = str(e)
    if Comm(dims).any_flag(problem is not None):
        raise UserError(problem or "the outputs are not free; see rank 0's error")
    try:
        yield
    finally:
        if claim is not None:
            claim.release()


class Session:
    """What stays loaded across the jobs of one run: components, FreeLOC, the parallel engine."""

    def __init__(self, cfg, profile, dims, log_fn, profile_2=None, loras=(), keep_text_encoder=False):
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        from . import memory
        from .parallel.comm import Comm
        from .sampling import predict_noise

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
        start = time.perf_counter()
        log_fn(f"loading {cfg.model.path} ({cfg.model.dtype}, {dims.device}, world {dims.world_size} = "
               f"cfg {dims.cfg_degree} x sp {dims.sp_degree})")
        self.dims, self.profile, self.log = dims, profile, log_fn
        self.parts = memory.load_placed(cfg, dims)
        self.profile_2, self.loras = profile_2, loras
        if loras:  # into the weights before memory settings, FreeLOC, the engine and torch.compile see them
            from .loras import apply_loras

            apply_loras(self.parts, loras, fuse=cfg.model.fuse_loras)
            log_fn(f"LoRA: {', '.join(f'{x.path.name} x{x.scale:g}' for x in loras)} "
                   f"({'fused' if cfg.model.fuse_loras else 'unfused'})")
        self.comm = Comm(dims)
        # `memory:` (text encoder, idle expert, sharded blocks) before FreeLOC and the engine see the weights
        self.memory = memory.install(cfg, self.parts, dims, self.comm, log_fn, keep_text_encoder=keep_text_encoder)
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
                                      strategy=cfg.parallel.strategy, comm=self.comm)
            self.predict = self.engine.predict
            if self.parts.transformer_2 is not None:  # its own hooks, the same groups and byte counters
                self.engine_2 = parallelize(self.parts.transformer_2, dims, backend=cfg.attention_backend,
                                            strategy=cfg.parallel.strategy, comm=self.comm)
                self.predict_2 = self.engine_2.predict
        from .caches import enable

        self.cache = enable(self.experts, cfg.cache, cfg.sampling.steps)  # after the engine (which adapts it)
        from .compile import LengthGraphs, compile_transformer

        # After FreeLOC and the engine (their attention is one custom op, so both modes trace whole blocks;
        # the engine's sharding and gathers stay eager).
        compiled = [compile_transformer(t, cfg.model.compile) for t in self.experts]
        # a queue's lengths: one length's block graphs at a time
        self.graphs = LengthGraphs(cfg.model.compile, [profile, profile_2][:len(self.experts)])
        if any(compiled):
            log_fn(f"torch.compile: {cfg.model.compile} (compiled on the first step)")
        self.predict, self.predict_2 = self.memory.wrap(self.predict), self.memory.wrap(self.predict_2)
        self.load_s = time.perf_counter() - start

    @property
    def experts(self) -> list:
        """The transformers of the model (two for Wan2.2 A14B), high-noise expert first."""
        return [t for t in (self.parts.transformer, self.parts.transformer_2) if t is not None]

    def any_flag(self, flag: bool) -> bool:
        return self.comm.any_flag(flag)


def run_jobs(pre: Preflight, options: RunOptions, session: Session, flag) -> int:
    lead, log_fn = session.dims.rank == 0, session.log
    queue = options.prompts is not None
    done, skipped, failed = [], [], []
    for index, cfg in enumerate(pre.configs):
        label = f"[job {index + 1}/{len(pre.configs)}] " if queue else ""
        if queue and cfg.output.is_file():  # decided from the filesystem every rank sees, before any collective
            log_fn(f"{label}skip: {cfg.output} exists")
            skipped.append(cfg.output)
            continue
        error = None
        try:
            if session.graphs.start_job((cfg.video.frames, cfg.video.height, cfg.video.width)):
                log_fn(f"{label}torch.compile: a new video shape, the block graphs compile again")
            job_resume = pre.resume
            if queue:
                job_resume = read_checkpoint(cfg, pre.profile, pre.kind, pre.profile_2) if options.resume else None
            out = render_one(cfg, options, session, flag, job_resume, label)
        except Preempted:
            raise
        except Exception as e:
            error = e
        # Every rank agrees on the job's outcome before the next one starts: a job that failed on one rank
        # only (rank 0 cannot write its video) fails on all, and no rank starts the next job's collectives
        # while another is still in this one's (the hang that waited out parallel.timeout_s).
        if not session.any_flag(error is not None):
            done.append(out)
            if lead:
                print(out, flush=True)
            continue
        if not queue:
            raise error if error is not None else RenderFailed("the render failed on another rank (see its error)")
        if error is not None:
            log(f"{label}failed: {cfg.prompt[:60]!r}: {type(error).__name__}: {first_line(error)}")
        else:
            log(f"{label}failed on another rank: {cfg.prompt[:60]!r}")
        failed.append(cfg.output)
    if queue and lead:
        log(f"queue: {len(done)} rendered, {len(skipped)} skipped (output exists), {len(failed)} failed"
            + "".join(f"\n  failed: {p}" for p in failed))
    return EXIT_FAILED if failed else 0


def render_one(cfg, options: RunOptions, session: Session, flag, resume, label: str) -> Path:
    """Sample (with checkpoints), decode over the ranks, write mp4 + sidecar on rank 0; returns the output."""
    import torch

    from .checkpoint import (
        Checkpoint,
        checkpoint_path,
        expert_key,
        fingerprint,
        fingerprint_settings,
        save_checkpoint,
        scheduler_state,
    )
    from .decode import DecodeStopped, can_decode_ranges, decode_ranges, iter_decode_spread
    from .families import family_of
    from .progress import Progress
    from .sampling import render
    from .storyboard import own_frames
    from .video import save_latents, write_json, write_mp4

    dims, log_fn = session.dims, session.log
    lead = dims.rank == 0
    start = time.perf_counter()
    v, s = cfg.video, cfg.sampling
    ckpt_path, every = checkpoint_path(cfg), cfg.checkpoint.every
    experts = expert_key(session.parts.transformer_2 is not None, session.parts.boundary_ratio, session.profile_2)
    settings = fingerprint_settings(cfg, session.profile, **experts)
    key = fingerprint(cfg, session.profile, **experts)
    for transformer in session.experts:  # past 1024 latent frames
        family_of(transformer).grow_rope(transformer, cfg.latent_frames)
    log_fn(f"{label}rendering {v.frames} frames ({cfg.latent_frames} latent) at {v.width}x{v.height}, "
           f"{s.steps} steps, seed {s.seed}" + (f", resuming after step {resume.step}" if resume else ""))
    if resume is None and options.resume:
        log_fn(f"{label}no checkpoint at {ckpt_path}: starting from step 0")
    sample_start = time.perf_counter()

    def after_step(step: int, latents, scheduler) -> None:
        stop = session.any_flag(flag.raised is not None)  # one all-reduce per step: every rank stops together
        final = step == s.steps
        if lead and (stop or (every and (step % every == 0 or final))):
            try:
                save_checkpoint(ckpt_path, Checkpoint(step=step, total_steps=s.steps, latents=latents,
                                                      scheduler=scheduler_state(scheduler),
                                                      rng=torch.get_rng_state(), fingerprint=key,
                                                      settings=settings))
            except OSError as e:  # rank 0 alone: raising here would leave the others in the next step
                log(f"{label}warning: checkpoint {ckpt_path} not written: {e.strerror or e}")
        if stop:
            session.any_flag(False)  # a barrier: rank 0 has finished writing before any rank exits
            raise Preempted(step, ckpt_path)

    progress = Progress(log_fn, start_step=resume.step if resume else 0, label=label)
    if session.cache is not None:
        session.cache.start()
    result = render(session.parts, cfg, decode=False, predict=session.predict, on_step=progress,
                    resume=resume, after_step=after_step, predict_2=session.predict_2,
                    encode_prompts=session.memory.encoder,
                    own_frames=own_frames(cfg.latent_frames, dims.sp_degree, dims.sp_rank))
    sample_s = time.perf_counter() - sample_start
    if session.cache is not None:
        from .caches import summary_line

        log_fn(f"{label}{summary_line(session.cache.summary(session.comm))}")
    if options.report_comm:
        report_comm(session, s.steps)
    if not bool(torch.isfinite(result.latents).all()):  # the same global latents on every rank
        raise RenderFailed(f"sampling ended with NaN or infinite latents; no video written ({cfg.output})")
    # Rank 0's writes can fail where the other ranks' work cannot: such an error waits in `pending` until
    # rank 0 has taken part in every collective of this job (decode), then fails the job on every rank.
    pending: list[Exception] = []
    if lead and options.save_latents is not None:
        try:
            save_latents(options.save_latents, result.latents)
            log_fn(f"latents: {options.save_latents}")
        except OSError as e:
            pending.append(RenderFailed(f"cannot write --save-latents {options.save_latents}: {e.strerror or e}"))
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

    frames = chunks()
    if lead:
        try:
            write_mp4(cfg.output, frames, fps=v.fps)
        except Preempted:
            raise
        except Exception as e:
            pending.append(RenderFailed(f"cannot write {cfg.output}: {type(e).__name__}: {first_line(e)}"))
    for _ in frames:  # the rest of the decode (all of it off rank 0): the other ranks are sending their frames
        pass
    decode_s = time.perf_counter() - decode_start
    if not lead:
        return cfg.output
    if pending:
        raise pending[0]
    received = session.comm.bytes.get("decode", 0)
    ranks = sum(e > s for s, e in decode_ranges(cfg.latent_frames, dims.world_size))
    ranks = ranks if can_decode_ranges(session.parts.vae) else 1
    log_fn(f"{label}decoded on {ranks} rank{'s' if ranks > 1 else ''}"
           f" and written in {decode_s:.1f}s" + (f" ({received / 2**20:.1f} MiB of frames from other ranks)"
                                                 if received else ""))
    timings = {"load_s": session.load_s, "sample_s": sample_s, "decode_and_write_s": decode_s,
               "render_s": time.perf_counter() - start,
               "s_per_step": sample_s / max(1, s.steps - (resume.step if resume else 0))}
    try:
        write_json(cfg.output.with_suffix(".json"), sidecar(cfg, session, resume, timings))
    except OSError as e:
        raise RenderFailed(f"cannot write the sidecar of {cfg.output}: {e.strerror or e}") from None
    ckpt_path.unlink(missing_ok=True)
    log_fn(f"{label}done in {timings['render_s']:.1f}s: {cfg.output}")
    return cfg.output


def sidecar(cfg, session: Session, resume, timings) -> dict:
    """What a render was: prompt, seed, config, profile, package versions, timings."""
    import platform
    from importlib import metadata

    from .schedulers import scheduler_class

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    from .storyboard import storyboard_of

    dims, profile = session.dims, session.profile
    return {
        "prompt": cfg.prompt,
        **({"storyboard": storyboard_of(cfg).to_mapping()} if cfg.storyboard is not None else {}),
        "seed": cfg.sampling.seed,
        "output": str(cfg.output),
        "config": dataclasses.asdict(cfg),
        "profile": {"path": str(cfg.profile), **profile.to_mapping()} if profile is not None else None,
        "world": {"size": dims.world_size, "cfg_degree": dims.cfg_degree, "sp_degree": dims.sp_degree,
                  "device": str(dims.device)},
        "scheduler": scheduler_class(cfg.sampling.scheduler, session.parts.scheduler).__name__,
        "loras": [lora.record() for lora in session.loras],
        "resumed_from_step": resume.step if resume is not None else None,
        "versions": {"python": platform.python_version(),
                     **{n: version(n) for n in ("freeloc_dist", "torch", "diffusers", "transformers",
                                                "imageio-ffmpeg")}},
        "timings": {k: round(x, 3) for k, x in timings.items()},
        "cache": session.cache.last if session.cache is not None else None,
    }


def dry_run(pre: Preflight, options: RunOptions) -> int:
    """Print the planner's estimate for the first job (rank 0 only); nothing is loaded."""
    from .planner import RenderPlanError, format_plan, plan_render

    if os.environ.get("RANK", "0") != "0":
        return 0
    cfg = pre.configs[0]
    te_path = Path(cfg.model.path) / "text_encoder" / "config.json"
    text_encoder_cfg = read_json(te_path) if te_path.is_file() else None
    ie_path = Path(cfg.model.path) / "image_encoder" / "config.json"
    try:
        plan = plan_render(cfg, pre.transformer_config, pre.profile, world_size=pre.world_size,
                           text_encoder_cfg=text_encoder_cfg, device_memory_gb=options.gpu_memory_gb,
                           peak_tflops=options.peak_tflops, model_kind=pre.kind,
                           image_encoder_cfg=read_json(ie_path) if ie_path.is_file() else None)
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
