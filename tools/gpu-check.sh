#!/usr/bin/env bash
# The one script run on the GPU machine (no internet there): builds the CUDA backend for sm_90,
# runs the C++ CUDA tests (ctest), the Python CUDA tests (pytest) and benchmarks/bench_cuda.py,
# and writes every log to $OUT/ (gpu-check.log holds everything; ctest.log, pytest.log,
# bench.log, build.log per stage).
#
# The image has Python 3.12 with torch (CUDA 13), numpy, pyarrow, ml_dtypes, hypothesis, pytest,
# pybind11, scikit-build-core, cmake, ninja and nvcc. It may lack libzstd's header and GoogleTest:
# prepare both here once, then carry them:
#     bash tools/gpu-check.sh --prepare        # fills build/gpu-deps/ (~5 MB, git-ignored)
#     run(command="bash tools/gpu-check.sh", carry=["build/gpu-deps"], timeout_s=540)
# build/gpu-deps holds zstd.h/zstd_errors.h/zdict.h and libzstd.so.1 (used only when the machine
# has no zstd of its own) and GoogleTest's sources (built there, ~20 s, when no GTest is found).
# Runs in ~3-5 min on an H100/H200: compile ~1.5 min, tests ~1 min, benchmark ~1-2 min.
set -uo pipefail
cd "$(dirname "$0")/.."
DEPS=build/gpu-deps

if [[ "${1:-}" == "--prepare" ]]; then
  rm -rf "$DEPS" && mkdir -p "$DEPS/zstd/include" "$DEPS/zstd/lib"
  cp /usr/include/zstd.h /usr/include/zstd_errors.h /usr/include/zdict.h "$DEPS/zstd/include/"
  so=$(ldconfig -p | awk '/libzstd\.so\.1 .*x86-64/ {print $NF; exit}')
  cp -L "$so" "$DEPS/zstd/lib/libzstd.so.1"
  cp -L "$so" "$DEPS/zstd/lib/libzstd.so"
  cp -r /usr/src/googletest "$DEPS/googletest"
  du -sh "$DEPS"
  exit 0
fi

OUT=${OUT:-/tmp/tv-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export PATH="/usr/local/cuda/bin:$PATH"
PY=${PYTHON:-python3}
JOBS=$(nproc)
status=0
stage() { echo; echo "== $* ($(date +%T))"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
nvcc --version | tail -2
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
$PY -c "import numpy, pyarrow, ml_dtypes; print('numpy', numpy.__version__, 'pyarrow', pyarrow.__version__, 'ml_dtypes', ml_dtypes.__version__)" || echo "WARN: a runtime dependency is missing"

stage "dependencies"
ZSTD_ARGS=()
if [[ -f /usr/include/zstd.h ]]; then
  echo "zstd: system"
else
  lib=$(ldconfig -p | awk '/libzstd\.so\.1 .*x86-64/ {print $NF; exit}')
  if [[ -z "$lib" ]]; then
    lib="$PWD/$DEPS/zstd/lib/libzstd.so.1"
    export LD_LIBRARY_PATH="$PWD/$DEPS/zstd/lib:${LD_LIBRARY_PATH:-}"
  fi
  echo "zstd: carried header, library $lib"
  ZSTD_ARGS=(-DTV_ZSTD_INCLUDE="$PWD/$DEPS/zstd/include" -DTV_ZSTD_LIB="$lib")
fi
TESTS=ON
GTEST_ARGS=()
sys_gtest=""
for f in /usr/lib/x86_64-linux-gnu/cmake/GTest/GTestConfig.cmake /usr/lib/cmake/GTest/GTestConfig.cmake \
         /usr/local/lib/cmake/GTest/GTestConfig.cmake; do
  [[ -f "$f" ]] && sys_gtest="$f"
done
if [[ -n "$sys_gtest" ]]; then
  echo "gtest: system ($sys_gtest)"
elif [[ -d "$DEPS/googletest" ]]; then
  echo "gtest: building the carried sources"
  if cmake -S "$DEPS/googletest" -B /tmp/gtest-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
       -DBUILD_GMOCK=OFF -DCMAKE_INSTALL_PREFIX=/tmp/gtest >/tmp/gtest.log 2>&1 &&
     cmake --build /tmp/gtest-build -j "$JOBS" >>/tmp/gtest.log 2>&1 &&
     cmake --install /tmp/gtest-build >>/tmp/gtest.log 2>&1; then
    GTEST_ARGS=(-DCMAKE_PREFIX_PATH=/tmp/gtest)
  else
    tail -20 /tmp/gtest.log; echo "WARN: no GoogleTest: C++ tests skipped"; TESTS=OFF
  fi
else
  echo "WARN: no GoogleTest (carry build/gpu-deps): C++ tests skipped"; TESTS=OFF
fi

stage "build (TV_ENABLE_CUDA=ON, sm_90)"
PYBIND11_DIR=$($PY -m pybind11 --cmakedir)
if ! { cmake -S . -B build/gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTV_ENABLE_CUDA=ON \
         -DCMAKE_CUDA_ARCHITECTURES=90 -DTV_BUILD_TESTS=$TESTS -DTV_WERROR=OFF \
         -DPython_EXECUTABLE="$(command -v $PY)" -Dpybind11_DIR="$PYBIND11_DIR" \
         "${ZSTD_ARGS[@]}" "${GTEST_ARGS[@]}" &&
       cmake --build build/gpu -j "$JOBS"; } >"$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  echo "FAIL: build"
  exit 1
fi
grep -iE "warning" "$OUT/build.log" | head -20
echo "build ok"

# The package from the source tree plus the freshly built extension.
PKG=/tmp/tvpkg
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r python/tensorvigil "$PKG/"
cp build/gpu/python/bindings/_core*.so "$PKG/tensorvigil/"
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"
$PY -c "import tensorvigil as tv, tensorvigil.cuda as c; print('tensorvigil', tv.__version__, 'cuda_available', c.cuda_available())"

if [[ $TESTS == ON ]]; then
  stage "ctest"
  ctest --test-dir build/gpu -j 8 --output-on-failure --timeout 180 >"$OUT/ctest.log" 2>&1 || status=1
  grep -E "tests passed|tests failed|StatsCuda.*(Passed|Failed|Skipped)|\*\*\*Failed" "$OUT/ctest.log" | head -30
fi

stage "pytest tests/python/test_cuda.py"
if $PY -c "import pytest" 2>/dev/null; then
  # From the tests folder, so tensorvigil comes from $PKG and not the source tree.
  (cd tests/python && $PY -m pytest -q -p no:cacheprovider -rs test_cuda.py \
     test_store_roundtrip.py test_errors.py) >"$OUT/pytest.log" 2>&1 || status=1
  tail -25 "$OUT/pytest.log"
else
  echo "WARN: pytest missing"
fi

stage "benchmarks/bench_cuda.py"
timeout 300 $PY benchmarks/bench_cuda.py >"$OUT/bench.log" 2>&1 || status=1
cat "$OUT/bench.log"

stage "done (status $status)"
exit $status
