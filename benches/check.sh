#!/usr/bin/env bash
# On the GPU machine, from the bundle folder: every GPU suite in turn while compute-sanitizer's four tools
# run beside them (each its own process), then a summary. Binaries missing from the bundle (`./x bundle
# --only ...`) are reported as skipped, not failed.
#
# Usage: bash check.sh [sanitize.sh driver arguments]   (default: all both bf16; `none` skips the sanitizers)
# Environment:
#   CHECK_TIMEOUT     seconds per suite (default 300); SANITIZE_TIMEOUT is passed on to sanitize.sh (default 400)
#   CHECK_CANDLE      path of the candle adapter's CUDA test binary (scripts/candle-cuda.sh), run when set
#   CHECK_CANDLE_LIBS LD_LIBRARY_PATH for it (the CUDA 13 runtime libraries, e.g. torch's nvidia/cu13/lib)
#   CHECK_PYTHON      path of tests/python/gpu_check.py, run with `--no-bench` when set (the package on PYTHONPATH)
#   OUT               folder for the logs (default: .)
# Prints `check: NAME PASS|FAIL|SKIP (seconds)` per step and a final `check: PASS` or `check: FAIL`; exits 1 on
# any failure.
set -uo pipefail
cd "$(dirname "$0")"
out=${OUT:-.}
limit=${CHECK_TIMEOUT:-300}
san_args=("$@")
[ ${#san_args[@]} -eq 0 ] && san_args=(all both bf16)
failed=0
summary=()

note() { summary+=("check: $1"); echo "check: $1"; }

# step NAME LOG COMMAND...: runs COMMAND under the time limit, logs it, judges it by its exit status.
step() {
    local name=$1 log=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$log" 2>&1
    local rc=$?
    local took=$((SECONDS - t0))
    if [ $rc -eq 0 ]; then
        note "$name PASS (${took} s) $(grep -E '^test result|PASS' "$log" | tail -1)"
    else
        failed=1
        [ $rc -eq 124 ] && note "$name FAIL: timed out after ${limit} s (log $log)" || note "$name FAIL: exit $rc (log $log)"
        grep -E "panicked|FAIL|failed" "$log" | head -5
    fi
}

# The sanitizers first, in the background: racecheck takes minutes, the others seconds.
pids=()
tools=()
if [ "${san_args[0]}" != none ]; then
    if [ -x ./example-sanitize ] && [ -f ./sanitize.sh ]; then
        for tool in memcheck initcheck synccheck racecheck; do
            OUT=$out bash sanitize.sh "$tool" "${san_args[@]}" > "$out/check-sanitize-$tool.txt" 2>&1 &
            pids+=($!)
            tools+=("$tool")
        done
    else
        note "sanitizers SKIP (no example-sanitize in this bundle)"
    fi
fi

suite() {
    local bin=$1; shift
    if [ -x "./$bin" ]; then
        step "$bin" "$out/check-$bin.log" "./$bin" "$@"
    else
        note "$bin SKIP (not in this bundle)"
    fi
}
suite test-gpu --test-threads=1
suite test-gpu_bwd --test-threads=1
suite test-gpu_raw --test-threads=1
suite test-gpu_mods --test-threads=1
suite test-gpu_paged --test-threads=1
suite test-kvcache gpu_ --test-threads=1
if [ -x ./flash-attn ]; then
    FLASH_ATTN_CLI=./flash-attn suite test-cli --test-threads=1
else
    note "test-cli SKIP (no flash-attn binary in this bundle)"
fi
if [ -n "${CHECK_CANDLE:-}" ]; then
    LD_LIBRARY_PATH=${CHECK_CANDLE_LIBS:-${LD_LIBRARY_PATH:-}} step candle "$out/check-candle.log" "$CHECK_CANDLE" --test-threads=1
fi
if [ -n "${CHECK_PYTHON:-}" ]; then
    step python "$out/check-python.log" python3 "$CHECK_PYTHON" --no-bench
fi

# Wait for the sanitizers by their process ids (a bare `wait` would also wait for any process substitution
# of the caller, e.g. a `tee` of this script's output).
for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    rc=$?
    line=$(grep -E "^sanitize ${tools[$i]}:" "$out/check-sanitize-${tools[$i]}.txt" | tail -1)
    if [ $rc -eq 0 ]; then
        note "${tools[$i]} PASS ${line#sanitize }"
    else
        failed=1
        note "${tools[$i]} FAIL: exit $rc ${line#sanitize } (log $out/check-sanitize-${tools[$i]}.txt)"
    fi
done

echo "---"
printf '%s\n' "${summary[@]}"
if [ $failed -eq 0 ]; then echo "check: PASS"; else echo "check: FAIL"; exit 1; fi
