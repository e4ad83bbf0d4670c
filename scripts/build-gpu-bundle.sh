#!/usr/bin/env bash
# Builds the release binaries the GPU check needs and copies them into .gpu/ (git-ignored), with
# a copy of ../shared/bench/hf_anchor.py. Then: device run with carry [".gpu"] and the command
# `bash scripts/gpu-check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
# NVRTC from pip (as in .ci/run) on the library path while building, so build.rs embeds every
# kernel as a cubin and the device compiles nothing; for sm_90 only (the lent H100 / H200), which
# keeps the seven binaries within the device tool's 64 MiB carry.
NV=$(python3 -c 'import nvidia, os; print([os.path.join(p, "cu13") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13"))][0])' 2>/dev/null || true)
if [ -z "$NV" ]; then
    echo "build-gpu-bundle: no NVRTC from pip: the binaries embed the kernel sources and the device compiles them" >&2
fi
export LD_LIBRARY_PATH="${NV:+$NV/lib}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export THINKSTEER_CUDA_ARCHS=90
cargo build --release --bin thinksteer
cargo test --release --no-run --test cuda_kernels --test cuda_model --test cuda_hybrid --test cuda_commands --test cuda_vector_grad 2>&1 | tee /tmp/gpu-bundle.log
cargo bench --no-run --bench kernels 2>&1 | tee /tmp/gpu-bundle-bench.log
rm -rf .gpu && mkdir -p .gpu/tests
cp target/release/thinksteer .gpu/
for t in cuda_kernels cuda_model cuda_hybrid cuda_commands cuda_vector_grad; do
    exe=$(grep -o "target/release/deps/$t-[0-9a-f]*" /tmp/gpu-bundle.log | tail -1)
    cp "$exe" ".gpu/tests/$t"
done
exe=$(grep -o "target/release/deps/kernels-[0-9a-f]*" /tmp/gpu-bundle-bench.log | tail -1)
cp "$exe" .gpu/kernel-bench
if [ -f ../shared/bench/hf_anchor.py ]; then cp ../shared/bench/hf_anchor.py .gpu/; fi
strip .gpu/thinksteer .gpu/kernel-bench .gpu/tests/* 2>/dev/null || true
du -sh .gpu
