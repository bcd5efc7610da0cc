# The part torchrun.sh and multinode.sh share, sourced by both (not run on its own): options, python,
# threads per process, the config check before any worker starts, and torchrun itself.

# The launcher's header comment (from line 2 to the first line that is not a comment) as its usage.
usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
    exit 2
}

# Options before the positional arguments (anything starting with --) go to torchrun unchanged:
# `split_options "$@"` fills `opts` and `rest`; the launcher then does `set -- "${rest[@]}"`.
split_options() {
    opts=() rest=()
    while [[ $# -gt 0 && "$1" == --* ]]; do
        [[ "$1" == "--help" ]] && usage
        opts+=("$1")
        shift
    done
    rest=("$@")
}

# `positive NAME VALUE`: exit 2 with one line unless VALUE is a positive whole number.
positive() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || { echo "${0##*/}: $1 must be a positive number, got '$2'" >&2; exit 2; }
}

# `python`: $PYTHON, else python or python3 on PATH.
find_python() {
    python="${PYTHON:-$(command -v python || command -v python3 || true)}"
    [[ -n "$python" ]] || { echo "${0##*/}: no python on PATH; set PYTHON=/path/to/python" >&2; exit 2; }
}

# Each of `procs` processes gets its share of the cores for intra-op threads (torchrun would force 1).
share_cores() {
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        local cores threads
        cores="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 1)"
        threads=$((cores / $1))
        export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
    fi
}

# `run_torchrun RENDEZVOUS_ARGS... -- SCRIPT [ARGS...]`: check the config, then exec torchrun.
run_torchrun() {
    local rdzv=()
    while [[ "$1" != "--" ]]; do
        rdzv+=("$1")
        shift
    done
    shift
    # A config error is answered here, once, before any worker starts (no torch import: well under a second).
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
    "$python" -m src.run.precheck "$@" || exit $?

    # torchrun itself; a worker's configuration error (exit 2) ends the job with exit 2 and no traceback.
    exec "$python" -m src.run.launch \
        "${rdzv[@]}" \
        --max-restarts="${MAX_RESTARTS:-0}" \
        ${opts[@]+"${opts[@]}"} \
        "$@"
}
