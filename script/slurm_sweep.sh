#!/usr/bin/env bash
# A sweep as a SLURM array job: one sweep point per array task, for more points than one machine holds.
#
#   bash script/slurm_sweep.sh CONFIG optimizer.lr=1e-4,1e-3,1e-2 batch=32,64 [key=value ...] [--random N]
#
# Run from the repository root, outside a job: it counts the points (python script/sweep.py ... --count)
# and submits itself with `sbatch --array=0-<N-1>`. Each task then trains its point with
# `python script/sweep.py ... --index $SLURM_ARRAY_TASK_ID`, skipping a finished point and resuming a
# cut one, so resubmitting the same command finishes only what is missing. When the array is done, run
# the same settings with script/sweep.py on any machine: every point is finished, so it only writes the
# summary table. `output` (default result/) must be on a file system every node sees.
# Adapt the #SBATCH lines (partition, account, time, GPUs) and the environment set-up to your cluster;
# extra sbatch options go in $SBATCH_ARGS, e.g. SBATCH_ARGS="--partition=gpu".
#
#SBATCH --job-name=sweep
#SBATCH --ntasks=1
#SBATCH --gpus=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%A_%a.out
#SBATCH --signal=TERM@120
set -euo pipefail

[[ $# -ge 2 ]] || { echo "usage: bash script/slurm_sweep.sh CONFIG key=v1,v2 ... [--random N]" >&2; exit 2; }
PYTHON="${PYTHON:-python}"
# source .venv/bin/activate   # or: module load ...; conda activate ...

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    count="$("$PYTHON" script/sweep.py "$@" --count)"
    # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
    exec sbatch ${SBATCH_ARGS:-} --array="0-$((count - 1))" "$0" "$@"
fi
# On SIGTERM (--signal above, 120 s before the time limit) training saves a checkpoint and exits.
exec "$PYTHON" script/sweep.py "$@" --index "$SLURM_ARRAY_TASK_ID"
