#!/usr/bin/env bash
# GPU checks of reproducibility and the GPU code paths, about 5-8 minutes on one GPU:
#
#   bash script/gpu_check.sh            # one PASS/FAIL line per check; exit 1 if any failed
#   bash script/gpu_check.sh --cpu      # the determinism and resume checks on the CPU (a smoke test)
#
# Checks: two runs with gpu.deterministic=true give identical weights; SIGKILL + resume equals the
# uninterrupted run; an op without a deterministic kernel stops the run with one error line; fp16
# (GradScaler) and bf16 runs; torch.compile with inductor; DDP over NCCL and FSDP2 with one process,
# and the FSDP run killed and resumed. Without CUDA it says so and exits 0.
# Environment: PYTHON (default: python), GPU_CHECK_KEEP=1 keeps the run directories.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
cpu=0
[[ "${1:-}" == "--cpu" ]] && cpu=1

if [[ $cpu == 0 ]] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: SKIPPED, no CUDA device is visible (torch.cuda.is_available() is False); run it on a GPU machine"
    exit 0
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
[[ "${GPU_CHECK_KEEP:-0}" == 1 ]] || trap 'rm -rf "$work"' EXIT
export PYTHONPATH="$PWD/script/gpu_check${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
passed=0
failed=0

if [[ $cpu == 1 ]]; then
    size=(model.width=8 dataset.input_shape=[3,16,16] dataset.train_size=256 batch=32 gpu.device=cpu)
    kill_at=12  # 8 steps per epoch: in epoch 2, after the save at step 10
else
    size=(model.width=64 dataset.input_shape=[3,32,32] dataset.train_size=4096 batch=64 gpu.device=cuda)
    kill_at=100  # 64 steps per epoch: in epoch 2, after the save at step 90
fi
common=(config/dummy.yaml "imports=[gpu_check_parts]" model.name=KillableCNN "${size[@]}"
        dataset.val_size=256 dataset.test_size=256 epoch=2 logging.mlflow=false logging.tensorboard=false
        logging.progress_bar=false logging.log_frequency=10)
det=(gpu.deterministic=true)

report() {  # report NAME STATUS DETAIL
    if [[ "$2" == 0 ]]; then
        passed=$((passed + 1)); echo "PASS  $1${3:+  ($3)}"
    else
        failed=$((failed + 1)); echo "FAIL  $1${3:+  ($3)}"
    fi
}

train() {  # train NAME [ARGS...]: output in $work/NAME, console in $work/NAME.log; returns the exit code
    local name="$1"; shift
    timeout 300 "$PY" train.py "$@" "output=$work/$name" >"$work/$name.log" 2>&1
}

resume() {  # resume NAME RUN [ARGS...]: continue RUN in place (plain python, or torchrun1 for NAME fsdp_*)
    local name="$1" run="$2"; shift 2
    if [[ "$name" == fsdp* ]]; then
        PYTHON="$PY" timeout 300 ./torchrun.sh 1 train.py "$run/config.yaml" "$@" >"$work/$name.log" 2>&1
    else
        timeout 300 "$PY" train.py "$run/config.yaml" "$@" >"$work/$name.log" 2>&1
    fi
}

torchrun1() {  # torchrun1 NAME [ARGS...]: one process under torchrun
    local name="$1"; shift
    PYTHON="$PY" timeout 300 ./torchrun.sh 1 train.py "$@" "output=$work/$name" >"$work/$name.log" 2>&1
}

run_of() { dirname "$(ls "$work/$1"/*/*/config.yaml | head -1)"; }
tail_of() { tail -c 300 "$work/$1.log" | tr '\n' ' '; }
same() { "$PY" script/gpu_check/compare.py "$(run_of "$1")" "$(run_of "$2")" 2>&1 | tail -1; return "${PIPESTATUS[0]}"; }

# 1. two deterministic runs
if train det_a "${common[@]}" "${det[@]}" && train det_b "${common[@]}" "${det[@]}"; then
    msg="$(same det_a det_b)"; report "two runs with gpu.deterministic=true give identical weights" $? "$msg"
else
    report "two runs with gpu.deterministic=true give identical weights" 1 "$(tail_of det_b)"
fi

# 2. SIGKILL at a fixed step, resume from the config, compare with the uninterrupted run
{ GPU_CHECK_KILL_AT=$kill_at train killed "${common[@]}" "${det[@]}" checkpoint.save_every_n_steps=10; } 2>/dev/null
code=$?
if [[ $code == 137 ]] && resume killed_resume "$(run_of killed)"; then
    msg="$(same killed det_a)"; report "SIGKILL + resume equals the uninterrupted run (gpu.deterministic=true)" $? "$msg"
else
    report "SIGKILL + resume equals the uninterrupted run (gpu.deterministic=true)" 1 "kill exit $code; $(tail_of killed_resume 2>/dev/null)"
fi

if [[ $cpu == 1 ]]; then
    echo "gpu_check --cpu: $passed passed, $failed failed"
    [[ $failed == 0 ]]; exit
fi

# 3. an op without a deterministic CUDA kernel: one error line naming it and the setting
train nondet "${common[@]}" "${det[@]}" model.name=MaxPooledCNN
code=$?
lines="$(grep -c '^error: .*no deterministic implementation.*gpu.deterministic' "$work/nondet.log")"
[[ $code == 1 && $lines == 1 && $(grep -c Traceback "$work/nondet.log") == 0 ]]
report "a non-deterministic op stops the run with one error line" $? "exit $code: $(grep '^error:' "$work/nondet.log" | cut -c1-120)"

# 4-6. precisions and compile
train fp16 "${common[@]}" gpu.precision=16; report "fp16 with GradScaler" $? "$(grep -o 'test: .*' "$work/fp16.log" | tail -1)"
train bf16 "${common[@]}" gpu.precision=bf16; report "bf16" $? "$(grep -o 'test: .*' "$work/bf16.log" | tail -1)"
train compiled "${common[@]}" model.compile=true model.compile_backend=inductor
report "torch.compile (inductor)" $? "$(grep -o 'test: .*' "$work/compiled.log" | tail -1)"

# 7. DDP over NCCL, one process
torchrun1 ddp "${common[@]}" distributed.strategy=ddp distributed.backend=nccl
report "DDP over NCCL (1 process)" $? "$(grep -o 'test: .*' "$work/ddp.log" | tail -1)"

# 8. FSDP2, one process: a run, and the same run killed and resumed
fsdp=("${common[@]}" "${det[@]}" distributed.strategy=fsdp distributed.backend=nccl checkpoint.save_every_n_steps=10)
torchrun1 fsdp "${fsdp[@]}"; report "FSDP2 (1 process)" $? "$(grep -o 'test: .*' "$work/fsdp.log" | tail -1)"
{ GPU_CHECK_KILL_AT=$kill_at torchrun1 fsdp_killed "${fsdp[@]}"; } 2>/dev/null
if resume fsdp_resume "$(run_of fsdp_killed)" && grep -q "resumed at epoch 2" "$work/fsdp_resume.log"; then
    msg="$(same fsdp_killed fsdp)"; report "FSDP2 killed + resumed equals the uninterrupted FSDP2 run" $? "$msg"
else
    report "FSDP2 killed + resumed equals the uninterrupted FSDP2 run" 1 "$(tail_of fsdp_resume)"
fi

echo "gpu_check: $passed passed, $failed failed on $("$PY" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)')"
[[ $failed == 0 ]]
