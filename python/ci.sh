#!/usr/bin/env bash
# The Python package's CI (no GPU, no torch): build the wheel, install it into a fresh venv with numpy
# and pytest from PyPI, and run tests/python/test_numpy.py against it (the CPU path on numpy arrays).
# Then the source distribution: `pip install` from it must need no nightly and no CUDA (the PTX ships in
# it), so its wheel is built on stable Rust outside this tree and imported in that venv.
#   python/ci.sh [pytest args]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
py=${PYTHON:-python3}
wheel=$(python/build.sh | tail -n 1)
venv=target/py-ci-venv
rm -rf "$venv"
"$py" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check numpy pytest
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "$wheel"
# From outside the source tree, so that `import flash_attn_rs` is the installed wheel.
cd "$root/tests/python"
"$root/$venv/bin/python" -m pytest -q -p no:cacheprovider test_numpy.py "$@"

cd "$root"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
target/maturin-venv/bin/maturin sdist -m python/Cargo.toml -o "$scratch" >&2
tar -xzf "$scratch"/flash_attn_rs-*.tar.gz -C "$scratch"
src=$(ls -d "$scratch"/flash_attn_rs-*/)
if [ -e "$src/rust-toolchain.toml" ]; then echo "sdist: ships rust-toolchain.toml (users would need the nightly)" >&2; exit 1; fi
# rustup's +stable, with the package check's stable build directory (its dependencies are compiled there).
(cd "$src" && env -u RUSTUP_TOOLCHAIN -u RUSTC -u CARGO RUSTUP_TOOLCHAIN=stable CARGO_TARGET_DIR="$root/target/package-check" \
    "$root/target/maturin-venv/bin/maturin" build --quiet --release -m python/Cargo.toml -o "$scratch/wheels" >&2)
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --force-reinstall "$scratch"/wheels/*.whl
(cd "$scratch" && "$root/$venv/bin/python" -c "
import numpy as np, flash_attn_rs as fa
q = np.random.default_rng(0).standard_normal((1, 9, 2, 64)).astype(np.float16)
out = fa.flash_attn_func(q, q, q, causal=True)
assert out.shape == q.shape and np.isfinite(out).all()
print('sdist: the wheel built from it on stable Rust imports and runs')")
