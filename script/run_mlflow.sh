#!/usr/bin/env bash
# Browse every tracked run in the MLflow UI.
#
# Usage (from the directory that holds result/, normally the repository root):
#   ./script/run_mlflow.sh                        # http://127.0.0.1:5000 over result/mlflow.db
#   PORT=5001 ./script/run_mlflow.sh              # another port
#   HOST=0.0.0.0 ./script/run_mlflow.sh           # reachable from other machines (mind who can see it)
#   MLFLOW_TRACKING_URI=sqlite:////abs/path/mlflow.db ./script/run_mlflow.sh   # another store
#   ./script/run_mlflow.sh --workers 2            # extra arguments go to `mlflow server`
set -euo pipefail

uri="${MLFLOW_TRACKING_URI:-sqlite:///$PWD/result/mlflow.db}"
host="${HOST:-127.0.0.1}"
port="${PORT:-5000}"
# The server's background job runner (GenAI evaluation jobs) is not needed to browse training runs
# and starts several extra processes; set this to true to keep it.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

if [[ -z "${MLFLOW_TRACKING_URI:-}" && ! -f "$PWD/result/mlflow.db" ]]; then
    echo "no MLflow store at $PWD/result/mlflow.db: run this from the directory holding result/" \
        "(after a training run), or set MLFLOW_TRACKING_URI" >&2
    exit 2
fi

if command -v mlflow >/dev/null 2>&1; then
    mlflow=(mlflow)
else
    mlflow=(python -m mlflow)
fi

echo "MLflow UI for $uri at http://$host:$port" >&2
exec "${mlflow[@]}" server --backend-store-uri "$uri" --host "$host" --port "$port" "$@"
