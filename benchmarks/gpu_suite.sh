#!/usr/bin/env bash
# One command for a machine with a GPU: the GPU tests, the whole benchmark suite, and the report.
#
#   bash benchmarks/gpu_suite.sh [--no-tests] [--no-bench] [--quick] [--allow-cpu] [--out DIR] [-- PYTEST_ARGS...]
#
# Writes under benchmarks/results/<device>-<date>/ (or --out DIR):
#   results.json  pytest-benchmark JSON of `pytest benchmarks/ --benchmark-only`
#   report.md     tables (python -m benchmarks.report), report.png  the chart
#   tests.log, check.log (python -m lora_kernels.check), bench.log, many_adapters.log, environment.txt
#
# Needs no network and no install: it runs from this checkout (PYTHONPATH=repo root) with the torch, triton,
# peft, pytest and pytest-benchmark already on the machine; it says what is missing and goes on where it can.
# PYTHON=... picks the interpreter (default: python3, else python). In a copy of the tree without .git, set
# LORA_BENCH_COMMIT=<sha> so the report can name the commit. PYTEST_ARGS go to the benchmark run
# (e.g. -- -k "lora_linear and forward+backward"). Exit status: non-zero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-$(command -v python3 || command -v python)}

RUN_TESTS=1 RUN_BENCH=1 ALLOW_CPU=0 OUT=""
BENCH_ARGS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --no-tests) RUN_TESTS=0 ;;
        --no-bench) RUN_BENCH=0 ;;
        --quick) export LORA_BENCH_QUICK=1 ;;
        --allow-cpu) ALLOW_CPU=1 ;;
        --out) OUT=$2; shift ;;
        --) shift; BENCH_ARGS=("$@"); break ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "gpu_suite: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

say() { printf '\n=== %s\n' "$*"; }

say "environment"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "gpu_suite: $PYTHON cannot import torch; set PYTHON=/path/to/python" >&2
    exit 2
fi
DEVICE=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')")
if [ "$DEVICE" = "cpu" ] && [ "$ALLOW_CPU" != 1 ]; then
    echo "gpu_suite: torch sees no CUDA device; this suite is for GPU machines (--allow-cpu runs it anyway)" >&2
    exit 2
fi
SLUG=$(printf '%s' "$DEVICE" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')
if [ -z "$OUT" ]; then
    OUT="benchmarks/results/$SLUG-$(date -u +%Y-%m-%d)"
    [ -e "$OUT" ] && OUT="$OUT-$(date -u +%H%M%S)"
fi
mkdir -p "$OUT" || exit 2

{
    echo "device: $DEVICE"
    echo "date (UTC): $(date -u '+%Y-%m-%d %H:%M:%S')"
    if git rev-parse HEAD >/dev/null 2>&1; then
        echo "commit: $(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' (with uncommitted changes)')"
    else
        echo "commit: ${LORA_BENCH_COMMIT:-unknown (no .git here: pass LORA_BENCH_COMMIT=<sha>)}"
    fi
    echo "python: $PYTHON ($("$PYTHON" --version 2>&1))"
    "$PYTHON" - <<'EOF'
import importlib
for name in ("torch", "triton", "peft", "pytest", "pytest_benchmark", "matplotlib", "safetensors", "tokenizers",
             "hypothesis"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {getattr(module, '__version__', 'present')}")
    except Exception as err:  # report every missing package, not only the first
        print(f"{name}: MISSING ({type(err).__name__}: {err})")
import torch
print(f"torch CUDA: {torch.version.cuda}, available: {torch.cuda.is_available()}")
try:
    importlib.import_module("lora_kernels.ops.lora_linear")
    print("lora_kernels.ops.lora_linear (Triton kernels): imports")
except Exception as err:
    print(f"lora_kernels.ops.lora_linear (Triton kernels): does not import ({err}); the triton rows will be skipped")
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} 2>&1 | tee "$OUT/environment.txt"
for needed in torch pytest pytest_benchmark; do
    if grep -q "^$needed: MISSING" "$OUT/environment.txt"; then
        echo "gpu_suite: $needed is required (pip install it, or carry a wheel)" >&2
        exit 2
    fi
done

STATUS=()
FAILED=0
run_step() {  # run_step NAME LOG COMMAND...: runs, logs, and records the outcome and duration
    local name=$1 log=$2 start rc
    shift 2
    say "$name: $*"
    start=$(date +%s)
    "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    STATUS+=("$(printf '%-10s exit %-3s %5ss  %s' "$name" "$rc" "$(( $(date +%s) - start ))" "$*")")
    [ "$rc" -ne 0 ] && FAILED=1
    return 0
}

if [ "$RUN_TESTS" = 1 ]; then
    # The test files parametrize fp32, fp16 and bf16 themselves; on CUDA the Triton kernels run natively.
    run_step tests "$OUT/tests.log" "$PYTHON" -m pytest tests -x -q
else
    STATUS+=("tests      skipped (--no-tests)")
fi

if [ "$RUN_TESTS" = 1 ]; then
    # Every kernel against the float64 reference at the benchmark shapes, then ours vs F.linear/eager/PEFT.
    run_step check "$OUT/check.log" "$PYTHON" -m lora_kernels.check
fi

if [ "$RUN_BENCH" = 1 ]; then
    run_step benchmarks "$OUT/bench.log" "$PYTHON" -m pytest benchmarks/ --benchmark-only \
        --benchmark-json="$OUT/results.json" ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"}
    # Many adapters in one batch (issue #21): the segmented kernels beside the concatenation and a loop.
    run_step adapters "$OUT/many_adapters.log" "$PYTHON" -m benchmarks.many_adapters --device cuda \
        --adapters 1 4 16 64 256 --width 4096 --rows 64 --seq 128
    if [ -s "$OUT/results.json" ]; then
        run_step report "$OUT/report.log" "$PYTHON" -m benchmarks.report "$OUT/results.json" --out "$OUT"
    else
        STATUS+=("report     skipped (no results.json)")
        FAILED=1
    fi
else
    STATUS+=("benchmarks skipped (--no-bench)")
fi

say "summary ($DEVICE)"
printf '%s\n' "${STATUS[@]}"
echo "results in $OUT:"
ls -l "$OUT"
exit $FAILED
