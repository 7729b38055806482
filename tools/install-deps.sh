#!/usr/bin/env bash
# System packages needed to build tensorvigil from source on Debian/Ubuntu:
# a C++17 compiler and the zstd library (+ GoogleTest and MXNet's runtime libraries with --test).
set -euo pipefail
pkgs=(g++ libzstd-dev)
if [[ "${1:-}" == "--test" ]]; then
  pkgs+=(libgtest-dev libgomp1)  # libgomp1 (+ libquadmath0): what the mxnet==1.9.1 wheel links
  pkgs+=(chromium)  # headless check of the HTML report (tests/python/test_report.py)
  if [[ $(uname -m) == x86_64 ]]; then pkgs+=(libquadmath0); fi
fi
if [[ "${1:-}" == "--fuzz" ]]; then
  pkgs+=(clang-14 libclang-rt-14-dev)  # libFuzzer + sanitizers for tools/fuzz.sh
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
