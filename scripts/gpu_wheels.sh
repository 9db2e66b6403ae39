#!/usr/bin/env bash
# Prepare the wheels the H200 GPU machine needs for bench/gpu_check.py, into .gpu_wheels/ (git-ignored).
#
# That machine has python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers 5.17, accelerate,
# safetensors, numpy, pytest and imageio, but neither diffusers nor imageio-ffmpeg, and no network; the
# working tree is copied there (64 MiB at most, ignored paths only when named in `carry`). So the
# missing packages travel as wheels, all pure-python (py3-none-any, checked below), ~8 MB: diffusers and what
# it needs beyond that machine's set (requests and its needs; importlib_metadata, zipp, lazy-importer;
# huggingface_hub, which shadows that machine's own, with its needs). Their versions and hashes come from
# requirements/lock.txt, the venv's lock: the set and the venv agree on every package they share. The lock keeps
# huggingface_hub below 2.0 because that machine's transformers 5.17 needs it so.
# imageio-ffmpeg is not needed (the check writes no video). scripts/check_wheels.py then verifies
# that every requirement of every wheel is met by the set or by a package the H200 has.
#
#   scripts/gpu_wheels.sh [DIR]      # default .gpu_wheels; wheels already in DIR are not downloaded again
#
# On the H200 machine (device tool: carry [".gpu_wheels"], timeout_s 560), one command:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/gw .gpu_wheels/*.whl && PYTHONPATH=/tmp/gw python3 bench/gpu_check.py --out $OUT/gpu_check.md
# PYTHONPATH puts these ahead of that machine's site-packages (its huggingface_hub is shadowed by 1.33.0).
# Should pip be missing there: the wheels are pure-python zips, so unpacking them is an install:
#   python3 -c "import glob, zipfile; [zipfile.ZipFile(w).extractall('/tmp/gw') for w in glob.glob('.gpu_wheels/*.whl')]"
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# The packages of the set, by name only: the versions are the lock's.
NAMES=(
    diffusers huggingface_hub
    requests charset_normalizer idna urllib3 certifi
    importlib_metadata zipp lazy-importer
    httpx httpcore h11 anyio click typing_extensions
)
mkdir -p "$DIR"
reqs=$(mktemp)
trap 'rm -f "$reqs"' EXIT
"$PY" scripts/lockfile.py pins "${NAMES[@]}" > "$reqs"
PINS=($(sed 's/ .*//' "$reqs"))
missing=0
for pin in "${PINS[@]}"; do
    stem=$(echo "${pin%%==*}" | tr 'A-Z-' 'a-z_')-${pin#*==}-
    ls "$DIR" 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^${stem}.*\.whl$" || missing=1
done
if [ "$missing" = 1 ]; then
    # --platform any: pure-python wheels only, so the set installs on that machine whatever its glibc.
    # --require-hashes: each file is the one the lock names.
    "$PY" -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version 3.12 \
        --implementation py --platform any -d "$DIR" -r "$reqs"
fi
"$PY" scripts/check_wheels.py "$DIR" "${PINS[@]}"
