#!/usr/bin/env bash
# Regenerates python/tensorvigil/_core.pyi from the installed extension (pybind11-stubgen).
# --check: fail when the committed stub differs from a fresh one.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
(cd "$out" && $PY -m pybind11_stubgen tensorvigil._core -o "$out" --numpy-array-remove-parameters >/dev/null)
gen="$out/tensorvigil/_core.pyi"
if [[ "${1:-}" == "--check" ]]; then
  if ! diff -u python/tensorvigil/_core.pyi "$gen"; then
    echo "python/tensorvigil/_core.pyi is stale: run tools/stubgen.sh and commit it" >&2
    exit 1
  fi
else
  cp "$gen" python/tensorvigil/_core.pyi
fi
