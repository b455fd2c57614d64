#!/usr/bin/env bash
# On the GPU machine, from the bundle folder: compute-sanitizer's memcheck, racecheck, synccheck and
# initcheck over every kernel family (example-sanitize, host/examples/sanitize.rs: both dtypes, every head
# dim, dense and packed with seqused padding and tail rows, causal + window and unmasked + softcap, GQA,
# forward, backward, deterministic backward, paged forward, the KV cache (append + rotary, decode,
# split-KV's combine); each without and with ALiBi + dropout +
# s_dmask (the _mods kernels and the probabilities kernel); the wgmma kernels (Hopper) and the mma.sync
# ones).
#
# Usage: bash sanitize.sh [all | TOOL[,TOOL...]] [driver arguments]
#   TOOL: memcheck, racecheck, synccheck, initcheck (default and `all`: the four, in that order)
#   driver arguments (any order): head dims `64,128` or `all`; `wgmma`, `mma` or `both` (default);
#   `bf16` or `f16` (default both); `plain` or `mods` (runs without / with the score modifiers only;
#   default both). E.g. `bash sanitize.sh racecheck 128 mma mods`.
# Prints one summary line per tool (errors; racecheck: hazards, errors and warnings) and a final
# `sanitize: PASS` or `sanitize: FAIL`; exits 1 on any finding, on a tool that did not finish (timeout,
# crash, refused device) or on a driver error. Logs: ${OUT:-.}/sanitize-TOOL.log.
# Environment: SANITIZE_TIMEOUT (seconds per tool, default 400), SANITIZE_BIN (default
# ./example-sanitize; ./sanitize_torch.py drives the Python package on torch tensors instead, the wheel
# importable), COMPUTE_SANITIZER (the tool's path), SANITIZE_PADDING (memcheck --padding bytes),
# SANITIZE_EXTRA (more compute-sanitizer options for every tool, split on spaces: e.g.
# `--racecheck-report all --print-limit 0` to have racecheck name each hazard's kind and threads).
set -uo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")"
cs=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls -d /usr/local/cuda/bin/compute-sanitizer /usr/local/cuda-*/bin/compute-sanitizer 2>/dev/null | tail -1)}
bin=${SANITIZE_BIN:-./example-sanitize}
limit=${SANITIZE_TIMEOUT:-400}
all="memcheck racecheck synccheck initcheck"
case "${1:-all}" in
    all) tools=$all; shift || true ;;
    -h|--help) sed -n '2,18p' "$self"; exit 0 ;;
    memcheck*|racecheck*|synccheck*|initcheck*) tools=${1//,/ }; shift ;;
    *) tools=$all ;;  # no tool named: the arguments are the driver's
esac
for t in $tools; do
    case " $all " in *" $t "*) ;; *) echo "sanitize: unknown tool '$t' (have: $all)"; exit 2 ;; esac
done
if [ -z "$cs" ] || [ ! -x "$cs" ]; then echo "sanitize: FAIL: compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 1; fi
if [ ! -x "$bin" ]; then echo "sanitize: FAIL: driver $bin not found (set SANITIZE_BIN)"; exit 1; fi
# The driver checks its arguments and counts its launches (assuming an H200) before any tool starts.
plan=$("$bin" "$@" --plan 2>&1) || { echo "$plan"; echo "sanitize: FAIL: bad driver arguments: $*"; exit 2; }
echo "sanitize: ${plan%%$'\n'*}"
help=$("$cs" --help 2>&1)
has() { grep -q -e "$1" <<<"$help"; }
echo "sanitize: $("$cs" --version 2>&1 | grep -m1 -i version), per-tool limit ${limit} s"

status=0
failed=""
for tool in $tools; do
    log="${OUT:-.}/sanitize-$tool.log"
    opts=(--tool "$tool" --error-exitcode 9)
    # racecheck follows the kernels' cp.async copies into shared memory (where this version has the
    # switch); SANITIZE_PADDING=N pads every allocation for memcheck (an access just past one tensor then
    # no longer lands unseen in the next; off by default: not yet tried with cudarc's stream-ordered
    # allocations).
    [ "$tool" = racecheck ] && has '--racecheck-memcpy-async' && opts+=(--racecheck-memcpy-async yes)
    [ "$tool" = memcheck ] && [ -n "${SANITIZE_PADDING:-}" ] && has '--padding' && opts+=(--padding "$SANITIZE_PADDING")
    # shellcheck disable=SC2206 # split on purpose: several options in one variable
    [ -n "${SANITIZE_EXTRA:-}" ] && opts+=(${SANITIZE_EXTRA})
    # initcheck does not see the copy engine's bulk tensor stores: out written by them (the Hopper
    # forward's O stage, `FwdParams::o_tma`) read back as uninitialized, every element (H100, 2026-12-06;
    # memcheck, racecheck, synccheck clean and the suites' canaries intact). So it runs the threads'
    # stores of that stage instead (FLASH_ATTN_FWD_NO_TMA_O=1); the other three tools run the bulk stores.
    envs=()
    [ "$tool" = initcheck ] && envs=(FLASH_ATTN_FWD_NO_TMA_O=1)
    start=$SECONDS
    timeout --kill-after=10 "$limit" env "${envs[@]}" "$cs" "${opts[@]}" "$bin" "$@" > "$log" 2>&1
    rc=$?
    secs=$((SECONDS - start))
    done_line=$(grep -m1 '^SANITIZE done' "$log")
    errors=$(grep -m1 -oE 'ERROR SUMMARY: [0-9]+' "$log" | grep -oE '[0-9]+$')
    verdict=""
    if [ "$tool" = racecheck ]; then
        # "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)": warnings count as findings too.
        race=$(grep -m1 -E 'RACECHECK SUMMARY' "$log")
        hz=$(grep -oE '[0-9]+ hazard' <<<"$race" | grep -oE '^[0-9]+')
        re=$(grep -oE '[0-9]+ error' <<<"$race" | grep -oE '^[0-9]+')
        rw=$(grep -oE '[0-9]+ warning' <<<"$race" | grep -oE '^[0-9]+')
        if [ -n "$race" ]; then
            found=$(( ${hz:-0} > ${re:-0} + ${rw:-0} ? ${hz:-0} : ${re:-0} + ${rw:-0} ))
            count="hazards ${hz:-?} (errors ${re:-?}, warnings ${rw:-?})"
        elif [ -n "$errors" ]; then
            found=$errors; count="errors $errors"
        else
            found=""; count="no summary"
        fi
    else
        found=$errors; count="errors ${errors:-?}"
        [ -n "$errors" ] || count="no summary"
    fi
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        verdict="FAIL (timed out after ${limit} s)"
    elif [ -z "$found" ]; then
        verdict="FAIL (no summary from compute-sanitizer: did not run; see the log)"
    elif [ "$found" -gt 0 ]; then
        verdict="FAIL"
    elif [ "$rc" -ne 0 ]; then
        verdict="FAIL (exit $rc)"
    elif [ -z "$done_line" ]; then
        verdict="FAIL (the driver did not finish)"
    else
        verdict="PASS"
    fi
    printf 'sanitize %-9s %-4s %-40s %4d s  %s  log %s\n' "$tool:" "${verdict%% *}" "$count" "$secs" "${done_line:-no SANITIZE done line}" "$log"
    if [ "$verdict" != PASS ]; then
        status=1
        failed="$failed $tool"
        [ "$verdict" = FAIL ] || echo "    ${verdict#FAIL }"
        # The first findings (with the kernel each names), or the log's end when the tool did not finish.
        if [ -n "$found" ] && [ "$found" -gt 0 ]; then
            grep -m 4 -A 2 -E '^========= +(Invalid|Uninitiali|Error|Warning|Race|Barrier|Program hit|Host API|Misaligned|Out of range|Malloc|Cuda|Unused)' "$log" | sed 's/^/    /'
        else
            tail -n 8 "$log" | sed 's/^/    /'
        fi
    fi
done
if [ "$status" -eq 0 ]; then
    echo "sanitize: PASS ($tools: no errors, no hazards)"
else
    echo "sanitize: FAIL (${failed# })"
fi
exit $status
