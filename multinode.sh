#!/usr/bin/env bash
# Several machines, NPROC processes on each, joined by torchrun's c10d rendezvous. Run it once per node:
#
#   ./multinode.sh [TORCHRUN_OPTIONS...] NNODES NPROC JOB_ID NODE_RANK HOST:PORT SCRIPT [ARGS...]
#   node 0:  ./multinode.sh 2 8 exp42 0 node0.cluster:29500 train.py config/my_exp.yaml
#   node 1:  ./multinode.sh 2 8 exp42 1 node0.cluster:29500 train.py config/my_exp.yaml
#
# JOB_ID: any string shared by the nodes of one job. HOST:PORT: a reachable address of node 0 and a
# free port there; node 0 (NODE_RANK 0) hosts the rendezvous, the others connect to it. Options before
# NNODES (anything starting with --) go to torchrun unchanged.
# Environment: MAX_RESTARTS (default 0), OMP_NUM_THREADS (default: cores / NPROC), PYTHON.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/script/launch_common.sh"

split_options "$@"
set -- ${rest[@]+"${rest[@]}"}
[[ $# -ge 6 ]] || usage
nnodes="$1" procs="$2" job_id="$3" node_rank="$4" endpoint="$5"
shift 5
positive NNODES "$nnodes"
positive NPROC "$procs"
[[ "$node_rank" =~ ^[0-9]+$ && "$node_rank" -lt "$nnodes" ]] \
    || { echo "multinode.sh: NODE_RANK must be 0..$((nnodes - 1)), got '$node_rank'" >&2; exit 2; }
[[ "$endpoint" == *:* ]] || { echo "multinode.sh: HOST:PORT expected, got '$endpoint'" >&2; exit 2; }

find_python
share_cores "$procs"
is_host=false
[[ "$node_rank" == 0 ]] && is_host=true

# Global ranks are handed out by the rendezvous, so the node holding rank 0 (the one that writes the
# result directory) need not be node 0: keep `output` on a file system every node sees.
run_torchrun \
    --nnodes="$nnodes" \
    --nproc-per-node="$procs" \
    --rdzv-backend=c10d \
    --rdzv-id="$job_id" \
    --rdzv-endpoint="$endpoint" \
    --rdzv-conf="is_host=$is_host" \
    -- "$@"
