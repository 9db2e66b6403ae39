"""Probe each self-attention layer of a model (Wan, HunyuanVideo) and write a FreeLOC profile (freeloc_dist.probing).

    python launch/probe.py --config CONFIG --out PROFILE
        [--probe-config configs/probing.yaml] [--prompt TEXT ...] [--frames N] [--trained-frames T]
        [--steps N] [--seed N] [--query-samples M] [--height H] [--width W] [--model-id ID]
        [--expert transformer|transformer_2] [--image PATH] [--last-image PATH]

    python launch/probe.py --config configs/tiny.yaml --out configs/profiles/toy-probed.yaml --steps 10 \
        --prompt "a red circle and a blue square" --prompt "a green square"    # the toy (README)

The render config gives the model, resolution, sampler and (through its profile) the trained length T;
configs/probing.yaml gives the probe settings and the decision rule; flags override both. For each
prompt the sampler runs at T frames (stock attention) and at the target length (every layer vrpr), and
each layer is probed at a few points of those trajectories. Image-to-video models (and TI2V-5B in image
mode) are conditioned on the config's image at both lengths, as a render is. Joint text-video models (HunyuanVideo)
also get their text phase probed (`text_phase` in the profile). Runs under torchrun too (trajectories and
layers split over the ranks; freeloc_dist.probing.run). This file only parses flags: a flag that sets a
render-config key or a probing setting is declared with that key. User errors are one line `error: ...`
on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # runnable from a checkout without installing the package

from freeloc_dist.cli import OneLineParser, config_flag, cwd_path, main_with_exit_codes, overrides_of  # noqa: E402
from freeloc_dist.family import EXPERT_NAMES  # noqa: E402

PROBING = "probing:"  # dest prefix of flags that set a probing setting (configs/probing.yaml)


def _parse_args(argv):
    p = OneLineParser(description="Probe each layer of a model and write a FreeLOC profile.")
    p.add_argument("--config", required=True, type=Path, help="render config YAML (model, resolution, sampler)")
    p.add_argument("--out", required=True, type=Path, help="profile to write, e.g. configs/profiles/NAME.yaml")
    p.add_argument("--probe-config", type=Path, help="probing settings YAML (default configs/probing.yaml)")
    config_flag(p, "--prompt", "prompts", prefix=PROBING, action="append",
                help="a probing prompt (repeatable; replaces the probe config's)")
    config_flag(p, "--frames", "frames", prefix=PROBING, type=int,
                help="target length of the context probe, output video frames (4k+1)")
    config_flag(p, "--trained-frames", "trained_frames", prefix=PROBING, type=int,
                help="T, latent frames the model was trained on")
    config_flag(p, "--steps", "steps", prefix=PROBING, type=int, help="sampling steps of the trajectories")
    config_flag(p, "--seed", "seed", prefix=PROBING, type=int, help="seed of the noise and of the query sample")
    config_flag(p, "--query-samples", "query_samples", prefix=PROBING, type=int,
                help="query rows per layer for attention statistics")
    config_flag(p, "--height", "video.height", type=int, help="video height in pixels")
    config_flag(p, "--width", "video.width", type=int, help="video width in pixels")
    config_flag(p, "--image", "image", type=cwd_path, metavar="PATH",
                help="image-to-video models: the first frame the trajectories are conditioned on (as rendered)")
    config_flag(p, "--last-image", "last_image", type=cwd_path, metavar="PATH",
                help="first-last-frame models (Wan2.1 FLF2V): the last frame")
    p.add_argument("--model-id", help="model id written into the profile (default: the config's profile's)")
    p.add_argument("--expert", default="transformer", choices=EXPERT_NAMES,
                   help="two-expert models (Wan2.2 A14B): which expert to probe, on its own steps; its base "
                        "profile is the config's profile (transformer) or profile_2 (transformer_2)")
    return p.parse_args(argv)



def run(argv=None) -> Path | None:
    from freeloc_dist.probing.run import run_probe

    args = _parse_args(argv)
    return run_probe(args.config, args.out, probe_config=args.probe_config, render_overrides=overrides_of(args),
                     probe_overrides=overrides_of(args, PROBING), model_id=args.model_id,
                     expert=args.expert)


def _run_and_print(argv=None) -> int:
    out = run(argv)
    if out is not None:
        print(out)
    return 0


def main(argv=None) -> int:
    return main_with_exit_codes(_run_and_print, argv)


if __name__ == "__main__":
    from freeloc_dist.parallel.exit import exit_process

    exit_process(main())
