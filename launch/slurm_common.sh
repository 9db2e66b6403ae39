# Sourced by launch/slurm_*.sbatch (from the repository root): what both recipes share.
#
# Settings a user may override in the environment of `sbatch` (Slurm exports it to the job):
#   FREELOC_NPROC_PER_NODE  workers (torchrun processes) per node; default: the GPUs Slurm allocated on the
#                           node (SLURM_GPUS_ON_NODE, set when the job asks for them: sbatch --gpus-per-node=8),
#                           else the GPUs nvidia-smi lists (clusters that hand out whole nodes without GRES),
#                           else 1 (a CPU node)
#   FREELOC_RDZV_PORT       TCP port of the torchrun rendezvous on the first node (default 29500)

freeloc_fail() {
    echo "error: $*" >&2
    exit 2
}

freeloc_workers_per_node() {
    local n
    if [ -n "${FREELOC_NPROC_PER_NODE:-}" ]; then
        n=$FREELOC_NPROC_PER_NODE
    elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
        n=$SLURM_GPUS_ON_NODE
    else
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
        [ "${n:-0}" -gt 0 ] 2>/dev/null || n=1
    fi
    case "$n" in
        '' | *[!0-9]* | 0) freeloc_fail "FREELOC_NPROC_PER_NODE=$n: must be a positive integer" ;;
    esac
    echo "$n"
}

# Sets the array freeloc_launch: one torchrun per node (srun task), c10d rendezvous on the first node. A task
# that fails makes srun end the others (--kill-on-bad-exit), so a dead rank cannot leave the rest waiting in a
# collective or in the rendezvous.
freeloc_launch_command() {
    local head_node workers port
    [ -n "${SLURM_JOB_ID:-}" ] || freeloc_fail "not inside a Slurm job (submit with sbatch)"
    head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    workers=$(freeloc_workers_per_node) || exit 2
    port=${FREELOC_RDZV_PORT:-29500}
    echo "freeloc: job $SLURM_JOB_ID on $SLURM_JOB_NUM_NODES node(s) x $workers worker(s), rendezvous ${head_node}:${port}" >&2
    freeloc_launch=(srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES"
        --ntasks-per-node=1
        .venv/bin/torchrun
        --nnodes="$SLURM_JOB_NUM_NODES"
        --nproc_per_node="$workers"
        --rdzv_backend=c10d
        --rdzv_endpoint="${head_node}:${port}"
        --rdzv_id="$SLURM_JOB_ID"
        launch/generate.py)
}

# The virtual environment of the checkout (created on first use; a no-op when it is up to date).
freeloc_setup() {
    bash scripts/setup_venv.sh || freeloc_fail "scripts/setup_venv.sh failed"
}
