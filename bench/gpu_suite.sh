#!/usr/bin/env bash
# The one-shot run for a machine with a CUDA GPU, in under 8 minutes:
#   1. the GPU (nvidia-smi) and llmkern's view of the machine (llmkern info)
#   2. llmkern check --quick on the Triton backend (every op, fwd and bwd, fp32/fp16/bf16, against the reference)
#   3. the test suite natively on CUDA: LLMKERN_BACKEND=triton, no interpreter, bf16 included
#   4. llmkern bench --quick: llmkern against torch's attention backends and the norm/NF4/LoRA peers
#   5. llmkern kernels for the GPU's own architecture (registers, spills, shared memory, tensor cores)
# and writes everything, plus summary.txt, into OUTDIR (default ./gpu-results/).
#
# Usage: bench/gpu_suite.sh [--dry-run] [OUTDIR]
#   --dry-run   print the GPU check's result and the commands, run nothing, exit 0
# Needs: python3 with torch (CUDA build), triton, pytest, pytest-benchmark, matplotlib. Wheels in .whl/
# at the repository root (e.g. bitsandbytes) are installed first into a private directory, offline.
# Environment: PYTHON (default python3); GPU_SUITE_TESTS: the test paths (default tests);
# GPU_SUITE_PYTEST_ARGS / GPU_SUITE_BENCH_ARGS: extra arguments
# for stages 3 / 4 (e.g. a -k selection); GPU_SUITE_SKIP_GPU_CHECK=1 runs without a GPU, only to test
# this script on a CPU machine (every output names the machine it ran on).
# Exit status: 0 all stages passed; 1 a stage failed or ran out of time; 2 no CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DRY=0
OUT=""
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        -*) echo "gpu_suite.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT=$arg ;;
    esac
done
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
START=$(date +%s)

# Per-stage limits in seconds: 15 + 75 + 180 + 120 + 75 = 465 s, inside the 8 minutes with the setup.
declare -A LIMIT=([info]=15 [check]=75 [tests]=180 [bench]=120 [kernels]=75)

die_no_gpu() {
    {
        echo "################################################################"
        echo "gpu_suite.sh: NO CUDA GPU: $1"
        echo "This script measures llmkern on a CUDA GPU and refuses to run without one."
        echo "################################################################"
    } >&2
    exit 2
}

gpu_problem() {
    if ! command -v nvidia-smi >/dev/null 2>&1; then
        echo "nvidia-smi is not on PATH"
        return
    fi
    if ! nvidia-smi -L >/dev/null 2>&1; then
        echo "nvidia-smi finds no GPU ($(nvidia-smi -L 2>&1 | head -1))"
        return
    fi
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
        echo "$PY's torch does not see a CUDA device (a CPU build of torch, or no driver)"
        return
    fi
}

PROBLEM=$(gpu_problem)
if [ "${GPU_SUITE_SKIP_GPU_CHECK:-0}" = 1 ]; then
    [ -n "$PROBLEM" ] && echo "gpu_suite.sh: GPU_SUITE_SKIP_GPU_CHECK=1: going on without a GPU ($PROBLEM)"
    PROBLEM=""
fi

XDIST=""
if [ "$DRY" = 0 ] && "$PY" -c "import xdist" >/dev/null 2>&1; then
    XDIST="-n 8"
fi
PYTEST_TIMEOUT=""
if [ "$DRY" = 0 ] && "$PY" -c "import pytest_timeout" >/dev/null 2>&1; then
    PYTEST_TIMEOUT="--timeout=120"
fi

declare -A CMD=(
    [info]="env LLMKERN_BACKEND=triton $PY -m llmkern.cli info --json"
    [check]="$PY -m llmkern.cli check --backend triton --quick --json $OUT/check.json"
    [tests]="env LLMKERN_BACKEND=triton $PY -m pytest ${GPU_SUITE_TESTS:-tests} -q -p no:cacheprovider -rfE $XDIST $PYTEST_TIMEOUT --junitxml=$OUT/tests.xml ${GPU_SUITE_PYTEST_ARGS:-}"
    [bench]="$PY -m llmkern.cli bench --quick --json $OUT/bench.json --plot $OUT/bench.png ${GPU_SUITE_BENCH_ARGS:-}"
    [kernels]="$PY -m llmkern.cli kernels --arch ARCH --json $OUT/kernels.json"
)
STAGES=(info check tests bench kernels)

if [ "$DRY" = 1 ]; then
    echo "gpu_suite.sh --dry-run: output directory $OUT"
    if [ -n "$PROBLEM" ]; then
        echo "GPU check: FAILS ($PROBLEM): a real run would stop here with exit status 2"
    else
        echo "GPU check: passes"
    fi
    for stage in "${STAGES[@]}"; do
        echo "stage $stage (limit ${LIMIT[$stage]} s): ${CMD[$stage]}"
    done
    exit 0
fi

[ -n "$PROBLEM" ] && die_no_gpu "$PROBLEM"

mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    SITE="$ROOT/.whl/site"
    echo "== installing the wheels of .whl/ into $SITE (offline)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" .whl/*.whl \
        || { echo "gpu_suite.sh: installing .whl/*.whl failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$SITE"
fi

echo "== GPU"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" || true
ARCH=$("$PY" -c "import torch; print('sm_%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo sm_90)
case "$ARCH" in sm_80|sm_86|sm_89|sm_90) ;; *) ARCH=sm_90 ;; esac
CMD[kernels]=${CMD[kernels]/ARCH/$ARCH}

declare -A STATUS ELAPSED
FAILED=()
for stage in "${STAGES[@]}"; do
    echo "== $stage: ${CMD[$stage]}"
    t0=$(date +%s)
    # SIGINT first so that pytest still writes its summary and JSON, SIGKILL 15 s later.
    timeout --signal=INT --kill-after=15 "${LIMIT[$stage]}" bash -c "${CMD[$stage]}" 2>&1 | tee "$OUT/$stage.txt"
    rc=${PIPESTATUS[0]}
    ELAPSED[$stage]=$(( $(date +%s) - t0 ))
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        STATUS[$stage]="TIMEOUT after ${LIMIT[$stage]} s"
        FAILED+=("$stage")
    elif [ "$rc" != 0 ]; then
        STATUS[$stage]="FAILED (exit $rc)"
        FAILED+=("$stage")
    else
        STATUS[$stage]="ok"
    fi
done
[ -s "$OUT/info.txt" ] && cp "$OUT/info.txt" "$OUT/info.json"

{
    echo "llmkern GPU suite, $(date -u +%Y-%m-%dT%H:%M:%SZ), $(( $(date +%s) - START )) s"
    echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
    "$PY" -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" 2>/dev/null
    echo
    for stage in "${STAGES[@]}"; do
        printf '%-8s %-24s %4s s\n' "$stage" "${STATUS[$stage]}" "${ELAPSED[$stage]}"
    done
    echo
    echo "check:   $(tail -n 1 "$OUT/check.txt" 2>/dev/null)"
    echo "tests:   $(grep -E '[0-9]+ (passed|failed)' "$OUT/tests.txt" 2>/dev/null | tail -n 1)"
    echo "kernels: $(tail -n 1 "$OUT/kernels.txt" 2>/dev/null)"
    echo
    echo "bench (speedup = peer time / llmkern time):"
    sed -n '/^llmkern bench:/,$p' "$OUT/bench.txt" 2>/dev/null
} > "$OUT/summary.txt"
cat "$OUT/summary.txt"

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_suite.sh: FAILED stages: ${FAILED[*]} (logs in $OUT/)" >&2
    exit 1
fi
echo "gpu_suite.sh: all stages passed; results in $OUT/"
