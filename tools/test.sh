#!/usr/bin/env bash
# Installs everything the tests need, builds, and runs the C++ (ctest) and Python (pytest) suites.
# Usage: bash tools/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${JOBS:-2}

bash tools/install-deps.sh --test
# The CPU build of torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
$PY -m pip install -q "torch==2.13.0" "cmake>=3.20" ninja
$PY -m pip install -q ".[test]"

echo "== C++ tests (ctest)"
cmake -S . -B build/cpp-tests -G Ninja -DCMAKE_BUILD_TYPE=Release -DTV_BUILD_PYTHON=OFF \
  -DTV_BUILD_TESTS=ON -DTV_WERROR=ON >/dev/null
cmake --build build/cpp-tests -j "$JOBS"
ctest --test-dir build/cpp-tests -j "$JOBS" --output-on-failure --timeout 300

echo "== Python tests (pytest)"
# Run from the tests folder so the installed package (not the source tree) is imported.
cd tests/python
$PY -m pytest -q -p no:cacheprovider "$@"
