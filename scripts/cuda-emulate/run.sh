#!/usr/bin/env bash
# Runs the kernels of kernels/*.cu on the CPU (emulate.h: blocks one at a time, a fiber per CUDA
# thread) against double-precision references written from each file's banner formula
# (check.cpp and the check_<family>.cpp it includes): every exported kernel of gemv.cu,
# attention.cu, prefill_attention.cu, gemm.cu, residual_norm.cu, rope.cu, embed.cu,
# elementwise.cu, sampling.cu, hybrid.cu, random.cu and grad.cu (attention vg_attn_*, products
# vg_mm_*, and vg_rmsnorm_*, vg_rope, vg_silu_mul_*, vg_xent, vg_rows, vg_steer_rows). Kernels
# taking a live row count (gemm, the gemv buckets, decode attention, silu_mul, argmax) are checked
# with and without one; hybrid.cu's gate-first kernels in check_gate.cpp.
# Prints one line per checked output (`ok` / `FAIL`), exits 1 on a failure. Run by `cargo test`
# (tests/kernel_emulator.rs) where g++ is present; the GPU tests remain the word on real hardware.
#
# The kernels are compiled from a copy in which `extern __shared__ T name[];` (dynamic shared
# memory, which C++ cannot declare at block scope) becomes a pointer to the launch's buffer
# (emulate.h); nothing else changes, line numbers included.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir "$tmp/kernels"
for f in "$here"/../../kernels/*; do
    sed -E 's/extern __shared__ ([A-Za-z_][A-Za-z_0-9]*) ([A-Za-z_][A-Za-z_0-9]*)\[\];/\1* const \2 = emu_dynamic_shared<\1>();/' \
        "$f" >"$tmp/kernels/$(basename "$f")"
done
if grep -n "extern __shared__" "$tmp"/kernels/*; then
    echo "run.sh: a dynamic shared declaration of another form; teach the sed above" >&2
    exit 1
fi
# -fno-strict-aliasing: the kernels read bf16 / f32 buffers through uint4 / float4 pointers.
# -march=native: built and run on the same machine; fmaf becomes one instruction (same result).
# -fsanitize=alignment: a misaligned vector load or store stops the check, as it faults on the GPU.
g++ -std=c++20 -O2 -pthread -w -fno-strict-aliasing -march=native -DTHINKSTEER_EMULATOR \
    -fsanitize=alignment -fno-sanitize-recover=alignment -include "$here/emulate.h" \
    -I "$tmp/kernels" -I "$here" -o "$tmp/check" "$here/check.cpp"
"$tmp/check"
