#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install freeloc_dist into it, never pulling a CUDA
# build of torch on a machine without a GPU (a bare `pip install torch` from PyPI would).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate

# find_spec, not import: importing torch costs seconds, and every Slurm job start runs this script.
if ! python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is None)" 2>/dev/null; then
    if pip install -q --no-deps --no-index "torch==${TORCH_VERSION}" 2>/dev/null; then
        pip install -q "torch==${TORCH_VERSION}"  # its pure-python dependencies; torch itself is satisfied
        echo "setup: torch ${TORCH_VERSION} from a local wheel" >&2
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        pip install -q "torch==${TORCH_VERSION}"
    else
        pip install -q "torch==${TORCH_VERSION}" --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
    fi
fi

# Installs diffusers, transformers, imageio-ffmpeg, pyyaml, safetensors, pytest; torch is satisfied.
stamp=.venv/.freeloc_installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    pip install -q -e ".[test]"
    touch "$stamp"
fi
