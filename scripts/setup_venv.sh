#!/usr/bin/env bash
# Create or reuse .venv at the repo root and install exactly requirements/lock.txt into it (every package at
# its locked version, checked against the lock's hashes, never resolved afresh), then freeloc_dist itself,
# editable. `make setup`, `make test`, `make render`, torchrun.sh, the Slurm recipes and CI all come through
# here. The lock's torch is the CPU build (/opt/wheels on the project's machines, else PyTorch's CPU index);
# on a host with an NVIDIA GPU the same torch release is installed as its CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOCK=requirements/lock.txt
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# This machine's pip configuration names local mirror folders that hold some packages only; pip warns once per
# package it does not find there. Those warnings say nothing about the install.
pip() { command pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# Reinstall only when the lock or the project's metadata changed since the last install (every Slurm job start
# runs this script; a matching stamp costs nothing).
stamp=.venv/.freeloc_lock
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -c1-64)
[ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && exit 0
rm -f "$stamp"

torch_line=$(grep -E '^torch==' "$LOCK" | sed 's/ .*//')   # torch==2.13.0+cpu
gpu_host() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
if gpu_host; then
    # The lock without its torch entry (the pin line and its hash lines), then torch's CUDA build of the same
    # release, whose nvidia-*/triton wheels torch itself pins exactly.
    awk '/^[^ ]/ {skip = ($0 ~ /^torch==/)} !skip' "$LOCK" > .venv/lock-no-torch.txt
    pip install -q --require-hashes --no-deps -r .venv/lock-no-torch.txt
    pip install -q "${torch_line%+cpu}"
else
    extra=()
    # The CPU wheel lies on this project's machines (pip's find-links); elsewhere PyTorch's CPU index has it.
    pip install -q --dry-run --no-index --no-deps "$torch_line" >/dev/null 2>&1 || extra=(--extra-index-url "$TORCH_CPU_INDEX")
    pip install -q --require-hashes --no-deps "${extra[@]}" -r "$LOCK"
fi
# What an earlier lock installed and this one dropped.
stale=$(python scripts/lockfile.py check --uninstall-list)
[ -z "$stale" ] || pip uninstall -q -y $stale
# The build backend (setuptools) is in the lock: no isolated build environment resolving afresh.
pip install -q --no-deps --no-build-isolation -e .
python scripts/lockfile.py check >&2
echo "$want" > "$stamp"
