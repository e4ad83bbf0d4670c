#!/usr/bin/env bash
# Runs the GPU tests (tests/cuda_*.rs) on the emulated CUDA driver (device.cpp): the engine, the
# hybrid step, the commands and the vector gradient, host code and CUDA graphs included, with
# every kernel running in the emulator — on a machine without a GPU, against the CPU backend.
# What it cannot show: timing, real concurrency between streams and blocks, and the compiled
# code (the GPU check on a lent card remains the word there). Extra arguments go to cargo test
# (e.g. --release). Needs g++ (C++20), cuda.h and NVRTC (as .ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
out="$PWD/target/cuda-emulate"
bash scripts/cuda-emulate/build-device.sh "$out"
# THINKSTEER_EXPECT_GPU=1: a test that finds no device fails instead of printing "skipped".
LD_LIBRARY_PATH="$out:${LD_LIBRARY_PATH:-}" THINKSTEER_EXPECT_GPU=1 \
    cargo test "$@" --test cuda_kernels --test cuda_model --test cuda_hybrid --test cuda_commands \
    --test cuda_vector_grad -- --test-threads=1
# Again with the other value of each GPU switch that these tests' sizes reach (README, "GPU
# switches"): gemm from 33 rows on the warpgroup (wgmma) kernels, 8-warp gemv blocks, RoPE inside
# decode attention, attention by GQA group, 48-row calls in the commands' engines (prompts
# prefilled in several chunks).
LD_LIBRARY_PATH="$out:${LD_LIBRARY_PATH:-}" THINKSTEER_EXPECT_GPU=1 THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=wg \
    THINKSTEER_GEMV_WARPS=8 THINKSTEER_ROPE=attn THINKSTEER_ATTN=group THINKSTEER_PREFILL_ROWS=48 \
    cargo test "$@" --test cuda_model --test cuda_hybrid --test cuda_commands -- --test-threads=1 \
    --skip persistent --skip ungated --skip smollm2
