#!/usr/bin/env bash
# Example SLURM batch script: 2 nodes x 4 GPUs, one ./multinode.sh agent per node.
#
#   sbatch script/slurm_example.sh config/my_exp.yaml [key=value ...]
#
# Adapt the #SBATCH lines (partition, account, time, GPUs) and the environment set-up to your cluster.
# Submit it from the repository root: SLURM starts the job there, and `output` (default result/)
# must be on a file system every node sees, since rank 0 may run on any node and FSDP ranks
# write their checkpoint shards into the same folder.
#
#SBATCH --job-name=train
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%j.out
#SBATCH --signal=TERM@120
set -euo pipefail

[[ $# -ge 1 ]] || { echo "usage: sbatch script/slurm_example.sh CONFIG [key=value ...]" >&2; exit 2; }
# source .venv/bin/activate   # or: module load ...; conda activate ...

gpus_per_node="${SLURM_GPUS_ON_NODE:-4}"
# The first node of the allocation hosts the rendezvous; the port only has to be free there.
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")  # (not `| head -1`: SIGPIPE + pipefail)
head_node="${nodes[0]}"
endpoint="$head_node:$((20000 + SLURM_JOB_ID % 20000))"
export OMP_NUM_THREADS="$((${SLURM_CPUS_PER_TASK:-$gpus_per_node} / gpus_per_node))"
# Uncomment when NCCL picks the wrong network interface:
# export NCCL_SOCKET_IFNAME=ib0

# One task per node; each computes its node rank from SLURM_NODEID. `--kill-on-bad-exit=1` ends the
# other nodes when one agent fails. MAX_RESTARTS=N lets torchrun restart the job, resuming the same run.
# On SIGTERM (`--signal` above, 120 s before the time limit) training saves a checkpoint and exits;
# `sbatch` the run's result/<...>/config.yaml to continue it.
srun --kill-on-bad-exit=1 bash -c '
    exec ./multinode.sh "$SLURM_NNODES" "$0" "$SLURM_JOB_ID" "$SLURM_NODEID" "$1" train.py "${@:2}"
' "$gpus_per_node" "$endpoint" "$@"
