#!/usr/bin/env bash
# Builds the flash_attn_rs wheel (abi3: CPython 3.9+, Linux x86-64) into target/wheels/, with maturin from
# PyPI installed into a venv under target/ (no CUDA, no torch needed). Prints the wheel's path last.
#   python/build.sh [extra maturin build args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
venv=target/maturin-venv
if [ ! -x "$venv/bin/maturin" ]; then
    "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "maturin>=1.8,<2"
fi
# The pinned nightly (rust-toolchain.toml) builds it, as it builds the rest of the workspace.
rm -f target/wheels/flash_attn_rs-*.whl
"$venv/bin/maturin" build --release --quiet -m python/Cargo.toml --out target/wheels "$@" >&2
ls target/wheels/flash_attn_rs-*.whl
