#!/usr/bin/env bash
# compute-sanitizer over the CUDA and Triton kernel tests (GPU machines only).
#
#   scripts/sanitize.sh                       # memcheck and racecheck over the op suite and the per-backend tests
#   scripts/sanitize.sh -k "unit_matches"     # extra arguments go to pytest (e.g. a subset)
#
# For each (tool, test file) it runs `compute-sanitizer --tool <tool> python -m pytest <file>`
# and prints one line:
#   [sanitize] memcheck tests/test_cuda.py: 0 errors; pytest rc=0 (212 passed, 4 skipped); 734 s; log /tmp/resnet_fused-sanitize/memcheck-test_cuda.sanitizer.log
# then one overall line. Exit status 0 iff every run reports 0 sanitizer errors and its pytest
# run passed.
#
# Environment (all optional):
#   PYTHON          interpreter with torch and resnet_fused installed (default: python)
#   SANITIZER       compute-sanitizer binary (default: on PATH, else $CUDA_HOME/bin, else /usr/local/cuda/bin)
#   TOOLS           sanitizer tools to run (default: "memcheck racecheck"; "initcheck synccheck" also work)
#   TESTS           test files (default: "tests/test_ops.py tests/test_backend_cuda.py tests/test_backend_triton.py")
#   LOG_DIR         where the full logs go (default: ${TMPDIR:-/tmp}/resnet_fused-sanitize)
#   WARM            1 (default): first run the tests once without the sanitizer, to fill the Triton
#                   cache and to know that they pass; 0 skips it
#
# Notes:
# - PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor is its own cudaMalloc, so an out-of-bounds
#   access that would land inside a cached block is reported instead of hidden.
# - TRITON_INTERPRET is unset: the Triton kernels run on the GPU, which is what is checked.
# - racecheck is slow (10-100x); pass -k to run a subset if time is short.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
TOOLS=${TOOLS:-memcheck racecheck}
TESTS=${TESTS:-tests/test_ops.py tests/test_backend_cuda.py tests/test_backend_triton.py}
LOG_DIR=${LOG_DIR:-${TMPDIR:-/tmp}/resnet_fused-sanitize}
WARM=${WARM:-1}

if [[ -z "${SANITIZER:-}" ]]; then
    SANITIZER=$(command -v compute-sanitizer || true)
    for dir in "${CUDA_HOME:-}" /usr/local/cuda; do
        [[ -z "$SANITIZER" && -n "$dir" && -x "$dir/bin/compute-sanitizer" ]] && SANITIZER="$dir/bin/compute-sanitizer"
    done
fi
if [[ -z "$SANITIZER" ]]; then
    echo "[sanitize] compute-sanitizer not found (set SANITIZER or CUDA_HOME)"
    exit 2
fi
if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[sanitize] no CUDA GPU visible to $PYTHON: nothing to sanitize"
    exit 2
fi
unset TRITON_INTERPRET
mkdir -p "$LOG_DIR"
"$PYTHON" -c "import torch, resnet_fused; print('[sanitize] torch', torch.__version__, 'on', torch.cuda.get_device_name(), '| backends:', resnet_fused.available_backends())"
echo "[sanitize] $("$SANITIZER" --version | tail -1)"

pytest_tail() {  # "212 passed, 4 skipped in 734.2s" -> "212 passed, 4 skipped"
    grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|xfailed|deselected)|no tests ran" "$1" | tail -1 \
        | sed -E 's/^=+ //; s/ =+$//; s/ in [0-9.]+s.*$//'
}

if [[ "$WARM" == "1" ]]; then
    for test in $TESTS; do
        log="$LOG_DIR/plain-$(basename "$test" .py).log"
        start=$(date +%s)
        "$PYTHON" -m pytest -q -p no:cacheprovider "$test" "$@" >"$log" 2>&1
        rc=$?
        echo "[sanitize] plain $test: pytest rc=$rc ($(pytest_tail "$log")); $(( $(date +%s) - start )) s; log $log"
    done
fi

status=0
summary=""
for tool in $TOOLS; do
    for test in $TESTS; do
        name="$tool-$(basename "$test" .py)"
        slog="$LOG_DIR/$name.sanitizer.log"
        plog="$LOG_DIR/$name.log"
        extra=()
        [[ "$tool" == "racecheck" ]] && extra=(--racecheck-report all)
        start=$(date +%s)
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool "$tool" ${extra[@]+"${extra[@]}"} --target-processes all \
            --print-limit 200 --log-file "$slog" \
            "$PYTHON" -m pytest -q -p no:cacheprovider "$test" "$@" >"$plog" 2>&1
        rc=$?
        # one "ERROR SUMMARY: N errors" per process; racecheck also prints "RACECHECK SUMMARY:
        # H hazards displayed (N errors, M warnings)", used when no ERROR SUMMARY is present
        errors=$(grep -hoE "ERROR SUMMARY: [0-9]+ error" "$slog" 2>/dev/null | awk '{s += $3} END {print s + 0}')
        if ! grep -qE "ERROR SUMMARY" "$slog" 2>/dev/null; then
            errors=$(grep -hoE "RACECHECK SUMMARY: .*\([0-9]+ error" "$slog" 2>/dev/null \
                | sed -E 's/.*\(([0-9]+) error/\1/' | awk '{s += $1} END {print s + 0}')
        fi
        summaries=$(grep -cE "(ERROR|RACECHECK) SUMMARY" "$slog" 2>/dev/null || echo 0)
        line="[sanitize] $tool $test: $errors errors; pytest rc=$rc ($(pytest_tail "$plog")); $(( $(date +%s) - start )) s; log $slog"
        if [[ "$summaries" == "0" ]]; then
            line="$line; NO SANITIZER SUMMARY (did it run?)"
            status=1
        fi
        if [[ "$errors" != "0" || "$rc" != "0" ]]; then
            status=1
        fi
        echo "$line"
        summary="$summary $tool:$(basename "$test" .py)=$errors"
    done
done
echo "[sanitize] overall: $([[ $status == 0 ]] && echo CLEAN || echo FAILED) -$summary"
exit $status
