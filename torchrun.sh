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

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

opts=()
while [[ $# -gt 0 && "$1" == --* ]]; do
    [[ "$1" == "--help" ]] && usage
    opts+=("$1")
    shift
done
[[ $# -ge 2 ]] || usage
procs="$1"
shift
[[ "$procs" =~ ^[1-9][0-9]*$ ]] || { echo "torchrun.sh: NPROC must be a positive number, got '$procs'" >&2; exit 2; }

python="${PYTHON:-$(command -v python || command -v python3 || true)}"
[[ -n "$python" ]] || { echo "${0##*/}: no python on PATH; set PYTHON=/path/to/python" >&2; exit 2; }
port="${MASTER_PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

# Each process gets its share of the cores for intra-op threads (torchrun would force 1).
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
    threads=$((cores / procs))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
fi

# A config error is answered here, once, before any worker starts (no torch import: well under a second).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
"$python" -m src.engine.precheck "$@" || exit $?

# torchrun itself; a worker's configuration error (exit 2) ends the job with exit 2 and no traceback.
exec "$python" -m src.engine.launch \
    --nnodes=1 \
    --nproc-per-node="$procs" \
    --rdzv-backend=c10d \
    --rdzv-id="${RDZV_ID:-job_${port}_$$}" \
    --rdzv-endpoint="127.0.0.1:$port" \
    --max-restarts="${MAX_RESTARTS:-0}" \
    ${opts[@]+"${opts[@]}"} \
    "$@"
