#!/usr/bin/env bash
# Render across all local GPUs, or with 2 gloo processes on a machine without CUDA.
#
#   ./torchrun.sh                                   # the embedded default (configs/tiny.yaml)
#   ./torchrun.sh --config configs/wan2.1-t2v-1.3b.yaml --seconds 60 --prompt "..."
#
# Every argument goes to launch/generate.py; without --config the embedded default is used.
# NPROC overrides the process count. Sets up .venv first (scripts/setup_venv.sh).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_venv.sh

if [ -z "${NPROC:-}" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') && [ "$gpus" -gt 0 ]; then
        NPROC=$gpus
    else
        NPROC=2
    fi
fi
args=("$@")
case " $* " in
    *" --config "*|*" --config="*) ;;
    *) args=(--config configs/tiny.yaml "${args[@]}") ;;
esac
# Validate first, in one process and without weights: a user error is then one line `error: ...` and
# exit 2 here, instead of each worker's line buried in torchrun's failure report (exit 1).
.venv/bin/python launch/generate.py "${args[@]}" --validate-only --world-size "$NPROC" || exit $?
exec .venv/bin/torchrun --standalone --nproc_per_node="$NPROC" launch/generate.py "${args[@]}"
