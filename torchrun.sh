#!/usr/bin/env bash
# One node, NPROC processes (one per GPU, or CPU processes with gloo):
#
#   ./torchrun.sh [TORCHRUN_OPTIONS...] NPROC SCRIPT [ARGS...]
#   ./torchrun.sh 4 train.py config/my_exp.yaml gpu.use="0,1,2,3"
#   ./torchrun.sh --max-restarts=3 4 train.py config/my_exp.yaml    # or MAX_RESTARTS=3 ./torchrun.sh ...
#
# Options before NPROC (anything starting with --) go to torchrun unchanged.
# Environment: MAX_RESTARTS (default 0): how often torchrun restarts the whole worker group after a
#   failure; a restarted train.py resumes its result directory by itself.
#   MASTER_PORT: rendezvous port (default: a free one), OMP_NUM_THREADS (default: cores / NPROC),
#   PYTHON (default: python, else python3).
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/script/launch_common.sh"

split_options "$@"
set -- ${rest[@]+"${rest[@]}"}
[[ $# -ge 2 ]] || usage
procs="$1"
shift
positive NPROC "$procs"

find_python
port="${MASTER_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
share_cores "$procs"

run_torchrun \
    --nnodes=1 \
    --nproc-per-node="$procs" \
    --rdzv-backend=c10d \
    --rdzv-id="${RDZV_ID:-job_${port}_$$}" \
    --rdzv-endpoint="127.0.0.1:$port" \
    -- "$@"
