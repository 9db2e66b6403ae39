"""The probe run behind launch/probe.py: validate, load once, run trajectories and probes split over the
ranks, gather the scores on rank 0 and write the profile.

Under torchrun every rank loads the whole model and runs whole-length forwards on its own device (no
sequence parallelism yet): rank r runs the trajectories of prompts r, r + world, ... and all ranks receive
every recorded state; then rank r probes layers r, r + world, ... on all of them, and rank 0 gathers the
scores and writes the profile. The scores do not depend on the world size.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from ..cli import UserError, log
from ..config import REPO_ROOT
from ..families.kind import FRAMES_RULE

_PROBE_TIMEOUT_S = 7 * 24 * 3600.0  # ranks meet only at the end; a long probe must not time out the group
_log = log


def _load(config_path: Path, out: Path, probe_config: Path | None, render_overrides: Mapping[str, Any],
          probe_overrides: Mapping[str, Any], expert: str):
    """Render config, probe settings, base profile and resolved lengths; no weights loaded. The base profile
    of `expert` is the config's `profile` (first expert) or `profile_2` (the second)."""
    from freeloc_dist.config import latent_frames, load_render_config
    from freeloc_dist.family import EXPERT_NAMES, ModelKindError, read_model_kind
    from freeloc_dist.models import check_model_dir
    from freeloc_dist.outputs import check_output_file
    from freeloc_dist.plan import PlanError, resolve_vrpr
    from freeloc_dist.preflight import image_checks
    from freeloc_dist.probing import load_probe_settings
    from freeloc_dist.profile import load_profile

    cfg = load_render_config(config_path, render_overrides)
    settings = load_probe_settings(probe_config, probe_overrides)
    for key, value in (("model.loras", list(cfg.model.loras)), ("sampling.scheduler", cfg.sampling.scheduler),
                       ("cache", cfg.cache)):
        if value and value != "model":  # probing's trajectories would silently differ from the render's
            raise UserError(f"{key}: launch/probe.py probes the model as shipped (its own scheduler, no LoRA, no "
                            f"cache); leave {key} out of the probe's config")
    check_output_file(out, "--out")  # nothing is created: the folder is made when the profile is written
    check_model_dir(cfg.model.path)
    try:
        kind = read_model_kind(cfg.model.path)
    except ModelKindError as e:
        raise UserError(f"model.path={str(cfg.model.path)!r}: {str(e).splitlines()[0]}") from None
    from freeloc_dist.family import model_family
    from freeloc_dist.preflight import check_joint_backend

    check_joint_backend(model_family(cfg.model.path), cfg.attention_backend)
    image_checks(cfg, kind, cfg.model.path)  # an image-to-video model probes with its image, as it renders
    experts = kind.experts
    if expert not in experts:
        raise UserError(f"--expert {expert}: the model at {cfg.model.path} has {' and '.join(experts)} "
                        f"(expected one of {', '.join(EXPERT_NAMES[:len(experts)])})")
    _check_expert_steps(cfg, kind, expert, settings.steps or cfg.sampling.steps)
    base, base_path = None, cfg.profile_2 if expert == "transformer_2" else cfg.profile
    if base_path is not None:
        try:
            base = load_profile(base_path)
        except ValueError as e:
            raise UserError(str(e).splitlines()[0]) from None
    trained = settings.trained_frames or (base.trained_frames if base is not None else None)
    if trained is None:
        raise UserError("probing.trained_frames: unknown; the render config names no profile, pass --trained-frames")
    target = latent_frames(settings.frames or cfg.video.frames)
    if target <= trained:
        raise UserError(f"target length {target} latent frames: must exceed trained_frames={trained} "
                        "(set --frames or probing.frames)")
    try:  # the baseline of the context probe runs every layer vrpr at the target length
        resolve_vrpr(target, trained, base.vrpr if base is not None else None)
    except PlanError as e:
        raise UserError(f"profile={str(cfg.profile)!r}: {e}") from None
    return cfg, settings, base, trained, target


_HINT_STEPS = 256  # how many more steps the refusal of an expert without steps looks through for a count that works


def expert_range(timesteps, boundary: float | None, expert: str, steps: int, hint=None) -> tuple[int, int]:
    """[first, end) of the step indices that `expert` denoises (all steps for a one-expert model); the
    experts split the trajectory at one timestep, so each expert's steps are contiguous. None of them: a
    UserError, naming the smallest step count `hint(n)` (timesteps of n steps) finds that gives it steps."""
    from freeloc_dist.config import MAX_STEPS
    from freeloc_dist.experts import expert_steps

    mine = expert_steps(timesteps, boundary, expert)
    if mine:
        return mine[0], mine[-1] + 1
    fix = "probe with more steps"
    if hint is not None:
        top = min(MAX_STEPS, steps + _HINT_STEPS)
        works = next((n for n in range(steps + 1, top + 1) if expert_steps(hint(n), boundary, expert)), None)
        fix = (f"probe with more steps (with --steps {works} it runs "
               f"{len(expert_steps(hint(works), boundary, expert))} of them)"
               if works is not None else f"no step count up to {top} gives it a step at this shift")
    raise UserError(f"--expert {expert}: runs none of the {steps} steps (boundary at timestep {boundary:g}); {fix}")


def _check_expert_steps(cfg, kind, expert: str, steps: int) -> None:
    """A two-expert model's `expert` must denoise at least one of `steps` steps: the split comes from the
    scheduler config (its timesteps at cfg's shift) and model_index.json's boundary_ratio, so no weights load."""
    if not kind.two_experts:
        return
    from freeloc_dist.experts import boundary_timestep
    from freeloc_dist.models import load_scheduler
    from freeloc_dist.sampling import scheduler_for_render

    template = load_scheduler(cfg.model.path)

    def timesteps(n: int):
        scheduler = scheduler_for_render(template, cfg.sampling.shift)
        scheduler.set_timesteps(n, device="cpu")
        return scheduler.timesteps

    expert_range(timesteps(steps), boundary_timestep(kind.boundary_ratio, template), expert, steps, hint=timesteps)


def _gather(dims, scores: dict, num_layers: int, forwards: int):
    """Merge per-rank scores (layer i measured on rank i % world) and forward counts on every rank."""
    import torch

    from freeloc_dist.parallel.comm import Comm

    names = sorted(scores)
    world = dims.world_size
    local = torch.stack([scores[k] for k in names], 1).to(dims.device)  # [num_layers, num_scores]
    counts = torch.tensor([[float(forwards)]], dtype=torch.float64, device=dims.device)
    comm = Comm(dims)
    everyone = comm.gather_frames(local, [num_layers] * world, dim=0, tag="probe").cpu()  # [world*layers, S]
    per_rank = comm.gather_frames(counts, [1] * world, dim=0, tag="probe").cpu()[:, 0]
    merged = torch.stack([everyone[(i % world) * num_layers + i] for i in range(num_layers)])
    return {k: merged[:, j] for j, k in enumerate(names)}, [int(c) for c in per_rank.tolist()]


def _together(comm, fn):
    """Run fn on every rank; if it fails on any rank, all ranks raise here (nobody waits in a collective)."""
    try:
        result, error = fn(), None
    except Exception as e:
        result, error = None, e
    if not _all_ok(comm, error is None):
        raise error if error is not None else RuntimeError("probing failed on another rank")
    return result


def _all_ok(comm, ok: bool) -> bool:
    """True iff every rank reports ok."""
    import torch

    dims = comm.dims
    flag = torch.tensor([0.0 if ok else 1.0], device=dims.device)
    return not bool(comm.gather_frames(flag, [1] * dims.world_size, dim=0, tag="status").any())


def _encode(parts, prompts, s, use_cfg, dtype, device):
    """([cond of each prompt], uncond or None), text states on the device in the model dtype."""
    from freeloc_dist.sampling import encode_prompt

    def encode(text):
        return encode_prompt(parts, text, s.max_text_tokens).to(device, dtype)

    return [encode(p) for p in prompts], (encode(s.negative_prompt) if use_cfg else None)


def _conditioning(parts, cfg, geometry, frames: int, device, dtype) -> dict:
    """The conditioning of a probe length (`frames` video frames), as a render of that length builds it (the
    family's render_inputs): {"condition": ...} for an image-to-video model, {"token_timesteps": ...} for
    per-token-timestep models, {} for text-to-video."""
    import dataclasses

    from freeloc_dist.families import family_of

    length = dataclasses.replace(cfg, video=dataclasses.replace(cfg.video, frames=frames))
    condition, per_token = family_of(parts.transformer).render_inputs(parts, length, geometry, None, device, dtype)
    return {key: value for key, value in (("condition", condition), ("token_timesteps", per_token))
            if value is not None}


def _trajectories(transformer, parts, geometry, my_prompts, texts, seed, steps, record, s, guidance, experts,
                  conditioning):
    """Recorded latents of this rank's prompts at one length, stacked: [len(my_prompts) * k, C, F, H, W];
    `guidance`: the classifier-free scale (the family's, Family.classifier_free); `conditioning`: that length's
    (`_conditioning`)."""
    import torch

    from freeloc_dist.probing import trajectory_inputs
    from freeloc_dist.sampling import initial_noise, scheduler_for_render

    device = next(transformer.parameters()).device
    out = []
    for p in my_prompts:
        noise = initial_noise(geometry, seed + p, device)
        scheduler = scheduler_for_render(parts.scheduler, s.shift)
        out += [inp.latents for inp in trajectory_inputs(transformer, scheduler, noise, texts[0][p], texts[1],
                                                         steps=steps, guidance=guidance, record=record,
                                                         experts=experts, **conditioning)]
    return torch.cat(out) if out else torch.empty((0, *geometry.shape[1:]), device=device)


def _share(comm, dims, local, num_prompts: int, k: int):
    """All ranks' recorded latents -> per prompt [k, C, F, H, W] (prompt p was run on rank p % world)."""
    world = dims.world_size
    owned = [list(range(r, num_prompts, world)) for r in range(world)]
    everyone = comm.gather_frames(local, [k * len(o) for o in owned], dim=0, tag="states")
    by_prompt, at = {}, 0
    for o in owned:
        for p in o:
            by_prompt[p], at = everyone[at : at + k], at + k
    return [by_prompt[p] for p in range(num_prompts)]


def _timesteps(parts, transformer, s, steps, record, device):
    from freeloc_dist.sampling import scheduler_for_render, set_timesteps

    scheduler = scheduler_for_render(parts.scheduler, s.shift)
    set_timesteps(transformer, scheduler, steps, device)
    return [scheduler.timesteps[i] for i in record]


def _shown_path(path: Path) -> str:
    """A path as written in configs: relative to the repository root when inside it."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def run_probe(config_path: Path, out: Path, *, probe_config: Path | None = None,
              render_overrides: Mapping[str, Any] | None = None, probe_overrides: Mapping[str, Any] | None = None,
              model_id: str | None = None, expert: str = "transformer") -> Path | None:
    """Probe every layer of `expert` (a two-expert model's `transformer` or `transformer_2`) and write the
    profile to `out`; returns `out` on rank 0 (None elsewhere). A two-expert model's trajectories run both
    experts, as a render does (the other one stock at T and vrpr at the target length, like the probed one),
    and the probe points are fractions of the probed expert's own steps."""
    cfg, settings, base, trained, target = _load(config_path, out, probe_config, render_overrides or {},
                                                 probe_overrides or {}, expert)

    # Validation done: from here on, heavy work.
    from diffusers.utils import logging as diffusers_logging
    from tqdm import tqdm
    from transformers.utils import logging as transformers_logging

    from freeloc_dist.experts import expert_schedule
    from freeloc_dist.families import family_of
    from freeloc_dist.models import load_components
    from freeloc_dist.parallel import destroy_parallel, init_parallel
    from freeloc_dist.parallel.comm import Comm
    from freeloc_dist.probing import (
        ProbeInput,
        Prober,
        assign_kinds,
        choose_text_phase,
        probed_profile,
        score_table,
        trajectory_steps,
        write_profile,
    )
    from freeloc_dist.sampling import latent_geometry, predict_noise, scheduler_for_render, set_timesteps

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    start = time.perf_counter()
    dims = init_parallel(cfg_degree=1, timeout_s=_PROBE_TIMEOUT_S)
    lead = dims.rank == 0
    try:
        s = cfg.sampling
        steps = settings.steps or s.steps
        seed = s.seed if settings.seed is None else settings.seed
        prompts = settings.prompts or (cfg.prompt,)
        if lead:
            _log(f"loading {cfg.model.path} ({cfg.model.dtype}, {dims.device}); world size {dims.world_size}"
                 + (": prompts' trajectories and layers split over ranks, each rank holds the whole model"
                    if dims.world_size > 1 else ""))
        parts = load_components(cfg.model.path, cfg.model.dtype, dims.device)
        transformer = getattr(parts, expert)
        family = family_of(transformer)
        use_cfg, cfg_scale = family.classifier_free(s)  # Wan: guidance_scale > 1; HunyuanVideo: true_cfg_scale > 1
        others = [t for t in (parts.transformer, parts.transformer_2) if t is not None and t is not transformer]
        schedule = expert_schedule(parts, parts.scheduler, cfg_scale, s.guidance_scale_2, predict_noise)
        scheduler = scheduler_for_render(parts.scheduler, s.shift)
        set_timesteps(transformer, scheduler, steps, dims.device)
        within = expert_range(scheduler.timesteps, schedule.boundary_timestep, expert, steps)
        record = trajectory_steps(settings.timesteps, steps, within)
        num_layers = len(family.attention_layers(transformer))
        mine = list(range(dims.rank, num_layers, dims.world_size))
        lengths = [FRAMES_RULE.frames(trained), FRAMES_RULE.frames(target)]  # output frames of the two probe lengths
        geometries = [latent_geometry(parts.vae, transformer, f, cfg.video.height, cfg.video.width) for f in lengths]
        if lead:
            which = f" of {expert} (its steps {within[0]}-{within[1] - 1})" if others else ""
            _log(f"probing {num_layers} layers{which}: T={trained} and F={target} latent frames at "
                 f"{cfg.video.width}x{cfg.video.height}, {len(prompts)} prompt(s), steps {record} of {steps}, "
                 f"seed {seed}")
        comm = Comm(dims)
        prober = Prober(transformer, trained_frames=trained, shifts=settings.shifts,
                        query_samples=settings.query_samples, measure_output=settings.measure_output, seed=seed,
                        vrpr=base.vrpr if base is not None else None, backend=cfg.attention_backend, layers=mine,
                        text_phase=base.joint_text_phase if base is not None else "phi")
        # the other expert's steps of the trajectories: same attention as the probed one's baseline
        passive = [Prober(t, trained_frames=trained, vrpr=base.vrpr if base is not None else None,
                          backend=cfg.attention_backend, layers=[]) for t in others]
        my_prompts = list(range(dims.rank, len(prompts), dims.world_size))
        cfg_passes = 2 if use_cfg else 1
        planned = (2 * len(my_prompts) * max(record) * cfg_passes  # trajectories stop at the last record
                   + len(prompts) * prober.planned_forwards(len(record), len(record)))
        bar = tqdm(total=planned, desc="forward passes", unit="fwd", disable=not lead, file=sys.stderr)
        for p in (prober, *passive):
            p.on_forward = lambda: bar.update(1)
        try:
            with contextlib.ExitStack() as stack:
                for p in (prober, *passive):
                    stack.enter_context(p)
                texts = _together(comm, lambda: _encode(parts, prompts, s, use_cfg, transformer.dtype, dims.device))
                # the same on every rank (deterministic), so each rank builds its own
                conditions = [_together(comm, lambda g=g, f=f: _conditioning(parts, cfg, g, f, dims.device,
                                                                               transformer.dtype))
                              for g, f in zip(geometries, lengths)]
                # Trajectories: prompt p on rank p % world; the recorded states are then shared by all ranks.
                states = [_together(comm, lambda g=g, c=c: _trajectories(transformer, parts, g, my_prompts, texts,
                                                                         seed, steps, record, s, cfg_scale,
                                                                         schedule, c))
                          for g, c in zip(geometries, conditions)]
                states = [_share(comm, dims, x, len(prompts), len(record)) for x in states]
                timesteps = _timesteps(parts, transformer, s, steps, record, dims.device)

                def probe_all():
                    for p in range(len(prompts)):
                        for latents, probe, c in zip(states, (prober.probe_position, prober.probe_context),
                                                     conditions):
                            for j, t in enumerate(timesteps):
                                probe(ProbeInput(latents=latents[p][j : j + 1], timestep=t, text=texts[0][p], **c))

                _together(comm, probe_all)
        finally:
            bar.close()
        scores, forwards = _gather(dims, prober.scores(), num_layers,
                                   prober.forward_passes + sum(p.forward_passes for p in passive))
        if not lead:
            return None
        kinds, applied = assign_kinds(scores, settings.rule)
        text_phase = None
        if family.joint_text:  # the text-phase probe (DESIGN 11), from the same baselines
            text_phase, drift = choose_text_phase(scores, kinds)
            applied = {**applied, **drift}
        seconds = time.perf_counter() - start
        settings_out = {
            "model_path": _shown_path(cfg.model.path),
            **({"image": _shown_path(cfg.image)} if cfg.image is not None else {}),
            **({"last_image": _shown_path(cfg.last_image)} if cfg.last_image is not None else {}),
            "dtype": cfg.model.dtype,
            "prompts": list(prompts),
            "seed": seed,
            "trained_frames": trained,
            "target_frames": target,
            "target_video_frames": lengths[1],
            "height": cfg.video.height,
            "width": cfg.video.width,
            "steps": steps,
            "guidance_scale": s.guidance_scale,
            **({"true_cfg_scale": s.true_cfg_scale} if s.true_cfg_scale != 1.0 else {}),
            "shift": s.shift,
            "timesteps": list(settings.timesteps),
            "probed_steps": record,
            "shifts": list(settings.shifts),
            "shift_frames": [x * (trained - 1) for x in settings.shifts],
            "window": f"{trained} frames [s, s+{trained}), s = clamp(a - {(trained - 1) // 2}, 0, F - {trained}); "
                      "phi positions in baseline and window",
            "query_samples": settings.query_samples,
            "measure_output": settings.measure_output,
            "attention_backend": cfg.attention_backend,
            "world_size": dims.world_size,
            "forward_passes": sum(forwards),
            **({"expert": expert, "expert_steps": list(within), "boundary_ratio": parts.boundary_ratio,
                "guidance_scale_2": s.guidance_scale_2} if others else {}),
            "seconds": round(seconds, 1),
        }
        model_id = model_id or (base.model if base is not None else Path(cfg.model.path).name)
        profile = probed_profile(model=model_id, trained_frames=trained, kinds=kinds,
                                 scores=score_table(scores, settings.shifts, trained), rule=settings.rule,
                                 applied=applied, settings=settings_out,
                                 base=base.to_mapping() if base is not None else None, family=family.name,
                                 text_phase=text_phase)
        write_profile(out, profile)
        per_rank = f" ({' + '.join(map(str, forwards))} over {len(forwards)} ranks)" if len(forwards) > 1 else ""
        _log("kinds: " + " ".join(f"{i}:{k}" for i, k in enumerate(kinds))
             + (f"; text_phase: {text_phase}" if text_phase is not None else ""))
        _log(f"forward passes: {sum(forwards)}{per_rank}; done in {seconds:.1f}s")
        return out
    finally:
        destroy_parallel(dims)
