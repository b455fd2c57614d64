#!/usr/bin/env bash
# On the GPU machine, from the bundle folder: our criterion benches and PyTorch's backends on the same
# shapes in one run, then the comparison tables (forward, then backward: bwd alone and fwd+bwd).
# Usage: bash run.sh [--fwd-only | --bwd-only | --decode] [shape-filter]
# (--decode: the KV-cache decode table alone, benches/decode.rs against torch_decode.py.)
set -uo pipefail
cd "$(dirname "$0")"
fwd=1 bwd=1
case "${1:-}" in
    --fwd-only) bwd=0; shift ;;
    --bwd-only) fwd=0; shift ;;
    --decode)
        shift
        out="${OUT:-.}"
        FA_BENCH_FILTER="${1:-}" ./bench-decode --bench 2>&1 | tee "$out/ours-decode.log" | grep -E "^(RESULT|device|SKIPPED)"
        python3 torch_decode.py "${1:-}" 2>&1 | tee "$out/torch-decode.log" | grep -E "^(RESULT|torch)"
        cat "$out/ours-decode.log" "$out/torch-decode.log" | python3 decode_table.py | tee "$out/decode-table.md"
        exit 0 ;;
    -*) sed -n '4,5p' "$0"; exit 2 ;;
esac
filter="${1:-}"
out="${OUT:-.}"
# The Python package, when its wheel was carried too (python/build.sh, carry target/wheels): the forward
# table then gains an "ours via Python" column at head dim 128.
whl=$(ls ../target/wheels/flash_attn_rs-*.whl 2>/dev/null | head -n 1)
# A wheel is a zip archive: unpacked with Python's zipfile, so no pip is needed in the torch environment.
if [ -n "$whl" ] && python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" /tmp/flash_attn_rs; then
    export PYTHONPATH="/tmp/flash_attn_rs${PYTHONPATH:+:$PYTHONPATH}"
fi
logs=()
if ((fwd)); then
    FA_BENCH_FILTER="$filter" ./bench-fwd --bench 2>&1 | tee "$out/ours.log" | grep -E "^(RESULT|device|SKIPPED)"
    python3 torch_fwd.py "$filter" 2>&1 | tee "$out/torch.log" | grep -E "^(RESULT|torch)"
    logs+=("$out/ours.log" "$out/torch.log")
fi
if ((bwd)); then
    FA_BENCH_FILTER="$filter" ./bench-bwd --bench 2>&1 | tee "$out/ours-bwd.log" | grep -E "^(RESULT|device|deterministic|SKIPPED)"
    python3 torch_bwd.py "$filter" 2>&1 | tee "$out/torch-bwd.log" | grep -E "^(RESULT|torch|SKIPPED)"
    logs+=("$out/ours-bwd.log" "$out/torch-bwd.log")
fi
cat "${logs[@]}" | python3 compare.py | tee "$out/table.md"
