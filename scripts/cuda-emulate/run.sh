#!/usr/bin/env bash
# Runs kernels of kernels/grad.cu, prefill_attention.cu and gemm.cu on the CPU (emulate.h: blocks one at a time, real threads per
# block) against double-precision references (check.cpp), to check kernel logic without a GPU.
# Not part of CI (slow, needs g++ with C++20); the GPU tests remain the word on real hardware.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp "$here/../../kernels/grad.cu" "$here/../../kernels/prefill_attention.cu" "$here/../../kernels/gemm.cu" "$tmp/"
cp "$here/common.cuh" "$here/emulate.h" "$here/check.cpp" "$tmp/"
g++ -std=c++20 -O2 -pthread -w -o "$tmp/check" "$tmp/check.cpp"
"$tmp/check"
