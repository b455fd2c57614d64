#!/usr/bin/env bash
# The Python package's CI (no GPU, no torch): build the wheel, install it into a fresh venv with numpy
# and pytest from PyPI, and run tests/python/test_numpy.py against it (the CPU path on numpy arrays).
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
