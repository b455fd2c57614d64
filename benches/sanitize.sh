#!/usr/bin/env bash
# On the GPU machine, from the bundle folder: compute-sanitizer over every kernel family
# (example-sanitize: both dtypes, every head dim, dense and packed with padding, masks, softcap, GQA,
# forward, backward, deterministic backward, wgmma and mma.sync kernels). One line per tool with its
# ERROR SUMMARY; exit status 1 if any tool reported an error.
# Usage: bash sanitize.sh [tools, comma-separated (default memcheck,racecheck,synccheck,initcheck)]
#                         [head dims, comma-separated] [wgmma|mma]
set -uo pipefail
cd "$(dirname "$0")"
cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
tools="${1:-memcheck,racecheck,synccheck,initcheck}"
shift || true
status=0
for tool in ${tools//,/ }; do
    log="${OUT:-.}/sanitize-$tool.log"
    start=$SECONDS
    "$cs" --tool "$tool" --error-exitcode 9 ./example-sanitize "$@" > "$log" 2>&1
    rc=$?
    summary=$(grep -E "ERROR SUMMARY|SANITIZE done|RACECHECK SUMMARY" "$log" | tr '\n' ' ')
    echo "$tool: exit $rc, $((SECONDS - start)) s: $summary"
    [ "$rc" -eq 0 ] || { status=1; grep -m 5 -E "^=========  *(Invalid|Uninitialized|Race|Barrier|Error)" "$log"; }
done
exit $status
