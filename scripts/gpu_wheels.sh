#!/usr/bin/env bash
# Prepare the wheels the H200 GPU machine needs for bench/gpu_check.py, into .gpu_wheels/ (git-ignored).
#
# That machine has python 3.12, torch 2.11 (CUDA 13), triton 3.6, transformers 5.17, accelerate,
# safetensors, numpy, pytest and imageio, but neither diffusers nor imageio-ffmpeg, and no network; the
# working tree is copied there (64 MiB at most, ignored paths only when named in `carry`). So the
# missing packages travel as wheels, all pure-python (py3-none-any, checked below), ~8 MB:
#   diffusers 0.42.1 (the version pyproject.toml pins) and what it needs beyond that machine's set:
#   requests (diffusers checks it at import) with charset_normalizer, idna, urllib3, certifi;
#   importlib_metadata, zipp, lazy-importer (declared by diffusers; stdlib is used on 3.12);
#   huggingface_hub 1.33.0: diffusers needs >= 1.32, transformers 5.17 needs < 2.0, and that machine's
#   own copy may be older; with its needs httpx, httpcore, h11, anyio, click, typing_extensions.
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
PINS=(
    diffusers==0.42.1
    huggingface_hub==1.33.0
    requests==2.34.2 charset_normalizer==3.5.3 idna==3.20 urllib3==2.8.0 certifi==2026.10.19.post1
    importlib_metadata==10.2.0 zipp==4.1.2 lazy-importer==0.1.0
    httpx==0.28.1 httpcore==1.0.9 h11==0.16.0 anyio==4.16.0 click==8.5.1 typing_extensions==4.16.0
)
mkdir -p "$DIR"
missing=()
for pin in "${PINS[@]}"; do
    name=${pin%%==*}; version=${pin#*==}
    stem=$(echo "$name" | tr 'A-Z-' 'a-z_')-$version-
    ls "$DIR" 2>/dev/null | tr 'A-Z' 'a-z' | grep -q "^${stem}.*\.whl$" || missing+=("$pin")
done
if [ ${#missing[@]} -gt 0 ]; then
    # --platform any: pure-python wheels only, so the set installs on that machine whatever its glibc.
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
        --platform any -d "$DIR" "${missing[@]}"
fi
"$PY" scripts/check_wheels.py "$DIR" "${PINS[@]}"
