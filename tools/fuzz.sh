#!/usr/bin/env bash
# Builds the libFuzzer target tests/fuzz/fuzz_shard.cpp (clang, ASan + UBSan) and fuzzes the
# shard/index/frame/container parsers for SECONDS seconds (default 60) on JOBS processes.
#   tools/fuzz.sh [SECONDS] [JOBS]
# Needs clang with libFuzzer (Debian: clang-14 libclang-rt-14-dev; see tools/install-deps.sh).
# Corpus: build/fuzz/corpus (seeded from small real runs by tests/fuzz/make_corpus.py);
# crashes are written to build/fuzz/artifacts/. The Python-side harness (manifest, side files,
# the whole tv.open path) is tests/fuzz/fuzz_open.py (atheris).
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_TO_RUN=${1:-60}
JOBS=${2:-1}
CXX=${CXX_FUZZ:-$(command -v clang++-14 || command -v clang++)}
out=build/fuzz
mkdir -p "$out/obj" "$out/corpus" "$out/artifacts"
flags=(-std=c++17 -O1 -g -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
       -Icpp/include -DNDEBUG)
objs=()
# The reader side only: the writer (and the statistics kernels it needs) is not under test.
for src in cpp/src/error.cpp cpp/src/dtype.cpp cpp/src/store/*.cpp cpp/src/stats/stats.cpp \
           cpp/src/internal/*.cpp; do
  [[ -f "$src" && "$src" != */stream_writer.cpp ]] || continue
  obj="$out/obj/$(echo "$src" | tr '/' '_').o"
  if [[ ! -f "$obj" || "$src" -nt "$obj" ]]; then
    "$CXX" "${flags[@]}" -c "$src" -o "$obj"
  fi
  objs+=("$obj")
done
"$CXX" "${flags[@]}" -fsanitize=fuzzer tests/fuzz/fuzz_shard.cpp "${objs[@]}" \
  -lzstd -lpthread -o "$out/fuzz_shard"
if [[ -z "$(ls -A "$out/corpus")" ]]; then
  PYTHONPATH=python${PYTHONPATH:+:$PYTHONPATH} python3 tests/fuzz/make_corpus.py "$out/corpus"
fi
export TV_FUZZ_TMP=${TV_FUZZ_TMP:-/dev/shm}
par=()
if (( JOBS > 1 )); then par=(-jobs="$JOBS" -workers="$JOBS"); fi  # writes fuzz-N.log in $out
root=$PWD
# tests/fuzz/regressions holds the inputs of fixed findings: replayed first, every run.
(cd "$out" && ./fuzz_shard corpus "$root/tests/fuzz/regressions" -artifact_prefix=artifacts/ \
  -max_total_time="$SECONDS_TO_RUN" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
  -max_len=262144 -print_final_stats=1 "${par[@]}") 2>&1 | tee "$out/last_run.log" |
  grep -E "^#|stat::|ERROR|SUMMARY|Done" | tail -40
