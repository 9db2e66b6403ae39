"""Render one clip with a Wan model (+ FreeLOC when the config names a profile), or a queue of them:
text-to-video, or image-to-video with --image (and --last-image for first-last-frame models).

    python launch/generate.py --config configs/tiny.yaml [--prompt TEXT] [--frames N | --seconds S]
        [--seed N] [--out PATH] [--save-latents PATH] [--steps N] [--scheduler NAME] [--height H] [--width W]
        [--lora PATH[:SCALE[:EXPERT]] ...] [--no-fuse-loras] [--backend sdpa|flex] [--profile PATH|none]
        [--image PATH] [--last-image PATH]

Under torchrun every rank runs this script: world = cfg_degree x sp_degree (config `parallel:`), latent
frames are sharded over the sp ranks, and rank 0 writes the outputs. This file only parses flags: flags that
set a config key are declared with that key (`config_flag`) and become the config's own dotted overrides;
the rest is freeloc_dist.render (validation on every rank first: freeloc_dist.preflight). Every user error is
one line `error: ...` on stderr and exit code 2, identical on every rank. Paths given on the command line are
relative to the working directory; paths inside a config file are relative to the repository root.

Production flags (README "Production rendering"): --resume / --checkpoint-every K (checkpoints; SIGTERM or
SIGUSR1 writes one and exits 75), --prompts FILE (a queue; outputs under --out-dir), --dry-run (the
planner: tokens, memory, FLOPs, bytes, time; no weights loaded), --quiet. Exit codes: freeloc_dist.cli.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing the package

from freeloc_dist.choices import (  # noqa: E402  (after sys.path)
    ATTENTION_BACKENDS,
    CACHES,
    COMPILE_MODES,
    EXPERT_PLACES,
    LORA_EXPERTS,
    SCHEDULER_CHOICES,
    STRATEGY_CHOICES,
    TEXT_ENCODER_PLACES,
)
from freeloc_dist.cli import (  # noqa: E402
    EXIT_FAILED,
    EXIT_PREEMPTED,
    EXIT_USAGE,
    OneLineParser,
    UserError,
    config_flag,
    cwd_path,
    given,
    main_with_exit_codes,
    overrides_of,
)
from freeloc_dist.parallel.decisions import CFG_DEGREES  # noqa: E402

__all__ = ["main", "run", "UserError", "EXIT_USAGE", "EXIT_PREEMPTED", "EXIT_FAILED"]

STOCK = "none"  # --profile none: stock attention


def profile_arg(text: str):
    return STOCK if text.lower() == STOCK else cwd_path(text)


def lora_arg(text: str) -> dict:
    """--lora PATH[:SCALE[:EXPERT]] as a model.loras entry: a trailing `:0.8`, `:low` or `:0.8:low` is read as the
    scale and expert unless the whole text names an existing file."""
    path, found = text, {}
    for key, parse in (("expert", lambda t: t if t in LORA_EXPERTS else None), ("scale", _number)):
        head, colon, tail = path.rpartition(":")
        if not colon or Path(cwd_path(path)).exists():
            break
        value = parse(tail)
        if value is not None:
            path, found[key] = head, value
        elif key == "scale" or _number(tail) is None:
            raise UserError(f"--lora {text!r}: {tail!r} is neither a scale nor an expert "
                            f"({', '.join(LORA_EXPERTS)}); the form is PATH[:SCALE[:EXPERT]]")
    return {"path": cwd_path(path), **found}


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def on_off(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be true or false")
    return text.lower() == "true"


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(description="Render a video clip with FreeLOC from a Wan or HunyuanVideo model (text- or "
                                  "image-to-video).")
    p.add_argument("--config", required=True, type=Path, help="render config YAML (e.g. configs/tiny.yaml)")
    config_flag(p, "--prompt", "prompt", help="text prompt (default: the config's)")
    config_flag(p, "--storyboard", "storyboard", type=cwd_path, metavar="FILE",
                help="a prompt schedule: YAML list of {at: SECONDS, prompt: TEXT} (README 'Storyboards')")
    length = p.add_mutually_exclusive_group()
    config_flag(length, "--frames", "video.frames", type=int, help="output video frames, 4k+1 (e.g. 81, 161, 321)")
    length.add_argument("--seconds", type=float, help="video length in seconds (nearest 4k+1 frames at the fps)")
    config_flag(p, "--seed", "sampling.seed", type=int, help="noise seed")
    config_flag(p, "--out", "output", type=cwd_path, help="output mp4 path")
    p.add_argument("--save-latents", type=Path, help="also write the final latents (safetensors, key 'latents')")
    config_flag(p, "--steps", "sampling.steps", type=int, help="sampling steps")
    config_flag(p, "--scheduler", "sampling.scheduler", choices=SCHEDULER_CHOICES,
                help="sampler: the model's own (default), or euler, unipc, dpm++ with the model's flow shift")
    config_flag(p, "--height", "video.height", type=int, help="video height in pixels (multiple of 16)")
    config_flag(p, "--width", "video.width", type=int, help="video width in pixels (multiple of 16)")
    config_flag(p, "--backend", "attention_backend", choices=ATTENTION_BACKENDS, help="FreeLOC attention backend")
    config_flag(p, "--profile", "profile", type=profile_arg, help="FreeLOC profile YAML, or 'none' for stock attention")
    config_flag(p, "--compile", "model.compile", choices=COMPILE_MODES, help="torch.compile the transformer")
    config_flag(p, "--lora", "model.loras", type=lora_arg, action="append", metavar="PATH[:SCALE[:EXPERT]]",
                help="a LoRA file (repeatable; replaces the config's model.loras); EXPERT of a two-expert model: "
                     f"{', '.join(LORA_EXPERTS)} (default: the first transformer)")
    config_flag(p, "--no-fuse-loras", "model.fuse_loras", action="store_const", const=False,
                help="keep LoRAs beside the weights (computed every call) instead of fusing them")
    config_flag(p, "--profile-2", "profile_2", type=profile_arg,
                help="two-expert models (Wan2.2 A14B): the low-noise expert's profile, or 'none'")
    config_flag(p, "--guidance-scale", "sampling.guidance_scale", type=float, help="classifier-free guidance scale")
    config_flag(p, "--guidance-scale-2", "sampling.guidance_scale_2", type=float,
                help="two-expert models: the low-noise expert's guidance scale (default: --guidance-scale)")
    config_flag(p, "--true-cfg-scale", "sampling.true_cfg_scale", type=float,
                help="guidance-embedded models (HunyuanVideo): > 1 runs true classifier-free guidance")
    config_flag(p, "--image", "image", type=cwd_path, metavar="PATH",
                help="image-to-video models: the first frame (PNG or JPEG, fitted to the render size)")
    config_flag(p, "--last-image", "last_image", type=cwd_path, metavar="PATH",
                help="first-last-frame models (Wan2.1 FLF2V): the last frame (PNG or JPEG)")
    config_flag(p, "--negative-prompt", "sampling.negative_prompt", help="negative prompt (default: the config's)")
    config_flag(p, "--cache", "cache.name", choices=CACHES,
                help="one of diffusers' caches (settings: the config's cache section, or --cache-threshold)")
    config_flag(p, "--cache-threshold", "cache.threshold", type=float,
                help="the cache's threshold (first_block, mag, sea)")
    config_flag(p, "--cfg-degree", "parallel.cfg_degree", type=int, choices=CFG_DEGREES,
                help="2: CFG passes on two rank groups")
    config_flag(p, "--strategy", "parallel.strategy", choices=STRATEGY_CHOICES,
                help="sequence-parallel attention strategy (default auto: cheapest by bytes)")
    p.add_argument("--report-comm", action="store_true", help="print bytes per rank per layer kind per step")
    mem = p.add_argument_group("memory (config memory:, freeloc_dist.memory)")
    config_flag(mem, "--text-encoder", "memory.text_encoder", choices=TEXT_ENCODER_PLACES,
                help="where prompts are encoded: gpu (the render device), cpu, or rank0 (broadcast to the others)")
    config_flag(mem, "--experts", "memory.experts", choices=EXPERT_PLACES,
                help="two-expert models: the idle expert resident on the device or offloaded to host memory")
    config_flag(mem, "--shard-weights", "memory.shard_weights", type=on_off, metavar="true|false",
                help="shard the transformer's blocks over the sequence-parallel ranks (FSDP2)")
    prod = p.add_argument_group("production")
    prod.add_argument("--resume", action="store_true",
                      help="continue from the render's checkpoint if there is one (else start from scratch)")
    config_flag(prod, "--checkpoint-every", "checkpoint.every", type=int, metavar="K",
                help="write a checkpoint every K steps")
    config_flag(prod, "--checkpoint", "checkpoint.path", type=cwd_path, metavar="PATH",
                help="checkpoint file (default: .<output name>.ckpt next to the output)")
    prod.add_argument("--prompts", type=Path, metavar="FILE",
                      help="a queue: one prompt per line, or JSON lines {prompt, seed, frames, output}")
    prod.add_argument("--out-dir", type=Path, metavar="DIR",
                      help="with --prompts: output folder (default: the folder of the config's output)")
    prod.add_argument("--dry-run", action="store_true",
                      help="print the plan (tokens, memory, FLOPs, bytes, time) without loading weights")
    prod.add_argument("--world-size", type=int, metavar="N", help="with --dry-run: ranks to plan for")
    prod.add_argument("--gpu-memory-gb", type=float, metavar="GB",
                      help="with --dry-run: memory per device; a plan that does not fit is refused (default 80)")
    prod.add_argument("--peak-tflops", type=float, metavar="T",
                      help="with --dry-run: sustained dense bf16 TFLOP/s per device for the estimate (default 400)")
    prod.add_argument("--quiet", action="store_true", help="errors and the output path only")
    prod.add_argument("--validate-only", action="store_true",
                      help="run every check (with --world-size N: for N ranks), load nothing, exit 0 or 2")
    args = p.parse_args(argv)
    if args.prompts is not None:
        for flag, value in (("out", given(args, "output")), ("save-latents", args.save_latents),
                            ("checkpoint", given(args, "checkpoint.path")), ("prompt", given(args, "prompt")),
                            ("storyboard", given(args, "storyboard"))):
            if value is not None:
                raise UserError(f"--{flag}: not allowed with --prompts (each job has its own; use --out-dir)")
    elif args.out_dir is not None:
        raise UserError("--out-dir: only with --prompts (use --out for one render)")
    every = given(args, "checkpoint.every")
    if every is not None and every < 0:
        raise UserError(f"--checkpoint-every={every}: must be >= 0")
    if args.world_size is not None and not (args.dry_run or args.validate_only):
        raise UserError("--world-size: only with --dry-run or --validate-only (torchrun sets the world size)")
    for flag, default in (("gpu_memory_gb", 80.0), ("peak_tflops", 400.0)):
        v = getattr(args, flag)
        if v is None:
            setattr(args, flag, default)
        elif not args.dry_run:  # a render never reads them: refused, not silently ignored
            raise UserError(f"--{flag.replace('_', '-')}: only with --dry-run (it sizes the plan, not a render)")
        elif not (math.isfinite(v) and v > 0):
            raise UserError(f"--{flag.replace('_', '-')}={v}: must be a positive number")
    return args


def run(argv: list[str] | None = None) -> int:
    from freeloc_dist.render import RunOptions
    from freeloc_dist.render import run as render_run

    args = _parse_args(argv)
    cwd = Path.cwd()
    options = RunOptions(resume=args.resume, prompts=args.prompts,
                         out_dir=cwd / args.out_dir if args.out_dir is not None else None,
                         save_latents=args.save_latents, dry_run=args.dry_run, world_size=args.world_size,
                         gpu_memory_gb=args.gpu_memory_gb, peak_tflops=args.peak_tflops,
                         report_comm=args.report_comm, quiet=args.quiet, validate_only=args.validate_only)
    overrides = overrides_of(args)
    for key in ("profile", "profile_2"):
        if overrides.get(key) == STOCK:
            overrides[key] = None
    return render_run(args.config, overrides, options, seconds=args.seconds)


def main(argv: list[str] | None = None) -> int:
    return main_with_exit_codes(run, argv)


if __name__ == "__main__":
    from freeloc_dist.parallel.exit import exit_process

    exit_process(main())
