"""A/B check for refactors that must not change what is computed: render every tiny config at F <= T and
F > T, on 1 and 2 gloo ranks, and resumed after a simulated crash, saving the final latents of each into DIR.
Run it on two trees and compare the folders bitwise (`cmp`, or `--compare A B`).

    python scripts/ab_latents.py DIR              # renders, from the tree this script lies in
    python scripts/ab_latents.py --compare A B    # exit 1 unless every file of A equals B's, byte for byte
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(ROOT, ".venv", "bin", "python")
# config -> (frames at F <= T, frames at F > T): T is 5 latent frames (17 video frames) for the random tiny
# models, 13 (49) for the trained toy (configs/tiny.yaml).
CONFIGS = {
    "tiny": (49, 77),
    "tiny-random": (17, 33),
    "tiny-random-a14b": (17, 33),
    "tiny-random-i2v": (17, 33),
    "tiny-random-flf2v": (17, 33),
    "tiny-random-i2v-a14b": (17, 33),
    "tiny-random-ti2v": (17, 33),
}
STEPS = 4
# Crash the render (as SIGKILL would: no cleanup) at its third transformer call; the periodic checkpoint
# (every step) was written before it; the rerun with --resume continues from there.
CRASH = """
import os, runpy, sys
import freeloc_dist.sampling as s
real, calls = s.predict_noise, [0]
def crashing(*a, **k):
    calls[0] += 1
    if calls[0] == 3:
        os._exit(9)
    return real(*a, **k)
s.predict_noise = crashing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


# The tree's own package, whatever the venv's editable install points at (two trees may share one venv).
ENV = {**os.environ, "PYTHONPATH": ROOT}


def render(out_dir: str, name: str, config: str, frames: int, world: int, resume: bool) -> None:
    latents = os.path.join(out_dir, f"{name}.safetensors")
    args = ["launch/generate.py", "--config", f"configs/{config}.yaml", "--frames", str(frames), "--steps",
            str(STEPS), "--seed", "3", "--out", os.path.join(out_dir, f"{name}.mp4"), "--save-latents", latents]
    if world > 1:
        cmd = [os.path.join(ROOT, ".venv", "bin", "torchrun"), "--standalone", f"--nproc_per_node={world}", *args]
    else:
        cmd = [PY, *args]
    if resume:
        crashed = subprocess.run([PY, "-c", CRASH, *args, "--checkpoint-every", "1"], cwd=ROOT,
                                 capture_output=True, text=True, env=ENV)
        assert crashed.returncode == 9, (name, crashed.returncode, crashed.stderr[-1500:])
        cmd += ["--resume", "--checkpoint-every", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        sys.exit(f"{name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    os.remove(os.path.join(out_dir, f"{name}.mp4"))
    print(name, flush=True)


def main(argv: list[str]) -> int:
    if argv[0] == "--compare":
        a, b = argv[1], argv[2]
        # the saved latents; the sidecar JSON of each render holds timings and paths, which differ run to run
        names = sorted(n for n in os.listdir(a) if n.endswith(".safetensors"))
        match, mismatch, errors = filecmp.cmpfiles(a, b, names, shallow=False)
        for n in names:
            print(("same  " if n in match else "DIFFER") + f" {n}")
        print(f"{len(match)} bitwise identical, {len(mismatch) + len(errors)} differ or missing")
        theirs = sorted(n for n in os.listdir(b) if n.endswith(".safetensors"))
        return 0 if names and not mismatch and not errors and theirs == names else 1
    out = os.path.abspath(argv[0])
    os.makedirs(out, exist_ok=True)
    for config, (short, long) in CONFIGS.items():
        for label, frames in (("short", short), ("long", long)):
            for world in (1, 2):
                render(out, f"{config}-{label}-w{world}", config, frames, world, resume=False)
        render(out, f"{config}-long-w1-resumed", config, long, 1, resume=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
