#!/usr/bin/env bash
# On the GPU machine: time builds against each other in one call. Each DIR is an unpacked bundle folder
# (e.g. `mkdir -p /tmp/a && tar xJf bundle-a.tar.xz -C /tmp/a`, then /tmp/a/bundle); the builds run one
# after the other, ROUNDS times over, with criterion's short settings, so every build sees the same clocks.
#
# Usage: bash ab.sh [-r ROUNDS] [-t SECONDS] BENCH FILTER DIR [DIR...]
#   BENCH   a bench binary of the bundles (bench-fwd, bench-bwd, bench-decode, ...)
#   FILTER  FA_BENCH_FILTER: comma-separated substrings of the row names (e.g. fwd/hdim128/s8192,mods/hdim64/)
#   -r      rounds (default 2); -t: stop starting runs once SECONDS have passed (default: no limit)
#   DIR@VAR=VALUE[,VAR=VALUE...] runs that bundle with those environment variables set (a knob's A/B within
#   one bundle: e.g. `/tmp/a/bundle /tmp/a/bundle@FLASH_ATTN_BWD_CHAIN_ALL=1`)
# Environment: AB_ARGS replaces `--warm-up-time 0.15 --measurement-time 0.5`; other variables (FLASH_ATTN_*,
# FA_DECODE_GRAPH, ...) reach every run alike.
# Prints each run's RESULT lines prefixed with the round and the build's index, then per row and timing kind
# the median milliseconds of each build over its rounds and their ratio to the first build (`time/b0`).
# A TERM or INT (an outer `timeout`, whose limit a run started just before `-t` can pass) stops the runs and
# prints the table of the runs so far (missing cells `-`), exit status 124.
set -uo pipefail
rounds=2
limit=0
while getopts "r:t:" o; do
    case $o in
        r) rounds=$OPTARG ;;
        t) limit=$OPTARG ;;
        *) sed -n '2,15p' "$0"; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -lt 3 ]; then sed -n '2,15p' "$0"; exit 2; fi
bench=$1 filter=$2
shift 2
dirs=("$@")
# Each build's folder and environment (`DIR@VAR=VALUE,...`: the assignments after the @, split on commas).
paths=() envs=()
for d in "${dirs[@]}"; do
    case $d in
        *@*) paths+=("${d%%@*}"); envs+=("${d#*@}") ;;
        *) paths+=("$d"); envs+=("") ;;
    esac
done
for d in "${paths[@]}"; do
    if [ ! -x "$d/$bench" ]; then echo "ab: $d/$bench not found"; exit 2; fi
done
read -r -a args <<< "${AB_ARGS:---warm-up-time 0.15 --measurement-time 0.5}"
log=$(mktemp)
# The table from the runs so far: at the end, or when a TERM / INT (an outer `timeout`) stops the runs.
summary() {
    python3 - "$log" "${#dirs[@]}" <<'PY'
import collections, statistics, sys
path, n = sys.argv[1], int(sys.argv[2])
ms = collections.defaultdict(lambda: [[] for _ in range(n)])
order = []
for line in open(path):
    f = line.split()
    # r<round> b<build> RESULT <kind> <row> <ms> <TFLOP/s or GB/s>
    if len(f) < 6:
        continue
    key = (f[3], f[4])
    if key not in ms:
        order.append(key)
    ms[key][int(f[1][1:])].append(float(f[5]))
print("| row | kind | " + " | ".join(f"b{i} ms" for i in range(n)) + " | " + " | ".join(f"b{i}/b0" for i in range(1, n)) + " |")
print("|---|---|" + "---:|" * (2 * n - 1))
for key in order:
    med = [statistics.median(v) if v else None for v in ms[key]]
    cells = [f"{m:.4f}" if m is not None else "-" for m in med]
    ratios = [f"{m / med[0]:.3f}" if m is not None and med[0] else "-" for m in med[1:]]
    print(f"| {key[1]} | {key[0]} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
PY
}
trap 'echo "ab: stopped; the table holds the runs so far"; summary; rm -f "$log"; exit 124' TERM INT
t0=$SECONDS
for ((r = 1; r <= rounds; r++)); do
    for i in "${!dirs[@]}"; do
        if [ "$limit" -gt 0 ] && [ $((SECONDS - t0)) -ge "$limit" ]; then
            echo "ab: time limit ($limit s) reached before round $r, build $i"
            break 2
        fi
        echo "ab: round $r build $i ${dirs[$i]}"
        IFS=, read -r -a vars <<< "${envs[$i]}"
        (cd "${paths[$i]}" && env "${vars[@]}" FA_BENCH_FILTER="$filter" "./$bench" --bench "${args[@]}" 2>/dev/null) | grep --line-buffered '^RESULT' | sed -u "s/^/r$r b$i /" | tee -a "$log"
    done
done
summary
rm -f "$log"
