#!/usr/bin/env bash
# Runs the kernels of kernels/grad.cu, prefill_attention.cu and gemm.cu on the CPU (emulate.h:
# blocks one at a time, a real thread per CUDA thread) against double-precision references
# (check.cpp), to check kernel logic without a GPU. Run by `cargo test` (tests/kernel_emulator.rs)
# where g++ is present; the GPU tests remain the word on real hardware.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
g++ -std=c++20 -O2 -pthread -w -DTHINKSTEER_EMULATOR -include "$here/emulate.h" -I "$here/../../kernels" \
    -o "$tmp/check" "$here/check.cpp"
"$tmp/check"
