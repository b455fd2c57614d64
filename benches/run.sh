#!/usr/bin/env bash
# On the GPU machine, from the bundle folder: our criterion benches and PyTorch's backends on the same
# shapes in one run, then the comparison table. Usage: bash run.sh [shape-filter]
set -uo pipefail
cd "$(dirname "$0")"
filter="${1:-}"
out="${OUT:-.}"
FA_BENCH_FILTER="$filter" ./bench-fwd --bench 2>&1 | tee "$out/ours.log" | grep -E "^(RESULT|device|SKIPPED)"
python3 torch_fwd.py "$filter" 2>&1 | tee "$out/torch.log" | grep -E "^(RESULT|torch)"
cat "$out/ours.log" "$out/torch.log" | python3 compare.py | tee "$out/table.md"
