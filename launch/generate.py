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

EXIT_USAGE = 2


class UserError(Exception):
    """An error in what the user asked for; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints usage + error; we keep user errors to one line
        raise UserError(message)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(description="Render a text-to-video clip with Wan2.1 and FreeLOC.")
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
    p.add_argument("--cfg-degree", type=int, choices=[1, 2], help="2: CFG passes on two rank groups")
    p.add_argument("--strategy", choices=["auto", "ulysses", "ring", "neighbour"],
                   help="sequence-parallel attention strategy (default auto: cheapest by bytes)")
    p.add_argument("--report-comm", action="store_true", help="print bytes per rank per layer kind per step")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace) -> dict:
    cwd = Path.cwd()
    out = {}
    for flag, key in [("prompt", "prompt"), ("seed", "sampling.seed"), ("steps", "sampling.steps"),
                      ("height", "video.height"), ("width", "video.width"), ("frames", "video.frames"),
                      ("backend", "attention_backend"), ("cfg_degree", "parallel.cfg_degree"),
                      ("strategy", "parallel.strategy")]:
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    if args.out is not None:
        out["output"] = str(cwd / args.out)
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


def _check_inputs(cfg, args: argparse.Namespace):
    """Everything that can be checked without loading weights. Returns the parsed profile (or None)."""
    from freeloc_dist.models import check_model_dir

    model_dir = check_model_dir(cfg.model.path)
    profile = None
    if cfg.profile is not None:
        from freeloc_dist.profile import load_profile

        if not cfg.profile.is_file():
            raise UserError(f"profile={str(cfg.profile)!r}: profile file not found")
        try:
            profile = load_profile(cfg.profile)
        except ValueError as e:
            raise UserError(str(e).splitlines()[0]) from None
        num_layers = json.loads((model_dir / "transformer" / "config.json").read_text()).get("num_layers")
        if num_layers is not None and profile.num_layers != num_layers:
            raise UserError(f"profile={str(cfg.profile)!r}: lists {profile.num_layers} layers, "
                            f"the model at {model_dir} has {num_layers}")
    elif cfg.attention_backend != "sdpa":
        _log(f"warning: attention_backend={cfg.attention_backend} has no effect without a profile")
    _check_world(cfg)
    for path in [cfg.output] + ([args.save_latents] if args.save_latents else []):
        try:
            Path(path).resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the folder of {path}: {e.strerror}") from None
    return profile


def _check_world(cfg) -> None:
    """World size against the config and the video, before any process group exists."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) < 1:
        raise UserError(f"WORLD_SIZE={world!r}: must be a positive integer")
    world, cfg_degree = int(world), cfg.parallel.cfg_degree
    if world % cfg_degree:
        raise UserError(f"parallel.cfg_degree={cfg_degree}: does not divide the world size {world}")
    if cfg_degree == 2 and cfg.sampling.guidance_scale <= 1.0:
        raise UserError("parallel.cfg_degree=2: needs sampling.guidance_scale > 1 (no unconditional pass otherwise)")
    sp = world // cfg_degree
    if sp > cfg.latent_frames:
        raise UserError(f"{world} ranks give {sp} sequence-parallel ranks but the video has only "
                        f"{cfg.latent_frames} latent frames; use more frames or fewer ranks")
    heads_ok = cfg.parallel.strategy != "ulysses"
    if not heads_ok:
        model_cfg = json.loads((Path(cfg.model.path) / "transformer" / "config.json").read_text())
        heads = model_cfg.get("num_attention_heads", 0)
        if heads % sp:
            raise UserError(f"parallel.strategy=ulysses: {heads} heads do not divide over {sp} ranks; use auto or ring")


_RANK_PREFIX = ""


def _log(message: str) -> None:
    print(f"{_RANK_PREFIX}{message}", file=sys.stderr, flush=True)


def run(argv: list[str] | None = None) -> Path | None:
    global _RANK_PREFIX
    args = _parse_args(argv)
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        _RANK_PREFIX = f"[rank {os.environ.get('RANK', '?')}] "
    cfg = _load_config(args)
    profile = _check_inputs(cfg, args)

    # Validation done on every rank: from here on, process groups and heavy work.
    from freeloc_dist.parallel import destroy_parallel, init_parallel

    dims = init_parallel(cfg_degree=cfg.parallel.cfg_degree, timeout_s=cfg.parallel.timeout_s)
    try:
        return _render(cfg, args, profile, dims)
    finally:
        destroy_parallel(dims)


def _render(cfg, args, profile, dims) -> Path | None:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from freeloc_dist.models import load_components
    from freeloc_dist.sampling import predict_noise, render
    from freeloc_dist.video import save_latents, write_mp4

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    lead = dims.rank == 0
    log = _log if lead else (lambda message: None)
    start = time.perf_counter()
    log(f"loading {cfg.model.path} ({cfg.model.dtype}, {dims.device}, world {dims.world_size} = "
        f"cfg {dims.cfg_degree} x sp {dims.sp_degree})")
    parts = load_components(cfg.model.path, cfg.model.dtype, dims.device)
    if profile is not None:
        from freeloc_dist.install import apply_freeloc

        try:
            apply_freeloc(parts.transformer, profile, backend=cfg.attention_backend)
        except ValueError as e:
            raise UserError(str(e).splitlines()[0]) from None
        log(f"FreeLOC: {cfg.profile} (trained_frames={profile.trained_frames}, backend={cfg.attention_backend})")
    else:
        log("FreeLOC: off (stock attention)")
    predict, engine = predict_noise, None
    if dims.world_size > 1:
        from freeloc_dist.parallel import parallelize

        engine = parallelize(parts.transformer, dims, backend=cfg.attention_backend, strategy=cfg.parallel.strategy)
        predict = engine.predict
    v, s = cfg.video, cfg.sampling
    log(f"rendering {v.frames} frames ({cfg.latent_frames} latent) at {v.width}x{v.height}, "
        f"{s.steps} steps, seed {s.seed}")

    def on_step(i: int, n: int, seconds: float) -> None:
        log(f"step {i}/{n}  {seconds:.1f}s")

    result = render(parts, cfg, decode=lead, predict=predict, on_step=on_step)
    if args.report_comm:
        _report_comm(engine, dims, parts.transformer, s.steps)
    if not lead:
        return None
    if args.save_latents is not None:
        save_latents(args.save_latents, result.latents)
        log(f"latents: {args.save_latents}")
    write_mp4(cfg.output, result.frames, fps=v.fps)
    log(f"done in {time.perf_counter() - start:.1f}s")
    return cfg.output


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


def _is_user_error(e: BaseException) -> bool:
    config = sys.modules.get("freeloc_dist.config")  # imported lazily: flag errors need no heavy import
    return isinstance(e, UserError) or (config is not None and isinstance(e, config.ConfigError))


def main(argv: list[str] | None = None) -> int:
    try:
        out = run(argv)
    except Exception as e:
        if not _is_user_error(e):
            raise
        print(f"{_RANK_PREFIX}error: {e}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    if out is not None:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
