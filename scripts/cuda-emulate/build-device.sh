#!/usr/bin/env bash
# build-device.sh OUT: builds the emulated CUDA driver (device.cpp) into OUT: OUT/libcuda.so (and
# libcuda.so.1) and one shared library per kernel file in OUT/modules (kernels/<stem>.cu compiled
# with emulate.h, exporting its kernels through trampoline.h). Put OUT first on LD_LIBRARY_PATH
# and every CUDA command and GPU test runs its kernels in the emulator (scripts/cuda-emulate/gpu-tests.sh).
# Needs g++ (C++20) and cuda.h: CUDA_HOME/include, /usr/local/cuda/include or the pip wheel's
# nvidia/cu13/include (THINKSTEER_CUDA_INCLUDE overrides).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$1"
inc="${THINKSTEER_CUDA_INCLUDE:-}"
for c in "${CUDA_HOME:+$CUDA_HOME/include}" /usr/local/cuda/include \
    "$(python3 -c 'import nvidia, os; print([os.path.join(p, "cu13", "include") for p in nvidia.__path__][0])' 2>/dev/null || true)"; do
    if [ -z "$inc" ] && [ -n "$c" ] && [ -f "$c/cuda.h" ]; then inc="$c"; fi
done
if [ -z "$inc" ]; then
    echo "build-device.sh: no cuda.h found (set THINKSTEER_CUDA_INCLUDE or install nvidia-cuda-runtime)" >&2
    exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# Modules of kernel files that no longer exist (or kernels that moved) must not linger.
rm -rf "$out/modules"
mkdir -p "$tmp/kernels" "$out/modules"
for f in "$here"/../../kernels/*; do
    sed -E 's/extern __shared__ ([A-Za-z_][A-Za-z_0-9]*) ([A-Za-z_][A-Za-z_0-9]*)\[\];/\1* const \2 = emu_dynamic_shared<\1>();/' \
        "$f" >"$tmp/kernels/$(basename "$f")"
done
# -fsanitize=alignment: a misaligned vector load or store (float4, uint4, ...; emulate.h aligns
# them as CUDA does) stops the program, as it faults on the hardware.
flags=(-std=c++20 -O2 -fPIC -pthread -w -fno-strict-aliasing -march=native -fvisibility=hidden -DTHINKSTEER_EMULATOR
    -fsanitize=alignment -fno-sanitize-recover=alignment
    -include "$here/emulate.h" -I "$tmp/kernels" -I "$here")
pids=()
for f in "$tmp"/kernels/*.cu; do
    stem=$(basename "$f" .cu)
    # The exported kernels, found after the preprocessor has expanded the macros that name them.
    names=$(g++ "${flags[@]}" -x c++ -E -P "$f" | tr '\n' ' ' | grep -oE 'extern "C" +void +[A-Za-z_0-9]+ *\(' |
        sed -E 's/extern "C" +void +([A-Za-z_0-9]+).*/\1/' | sort -u)
    {
        echo "#include \"$stem.cu\""
        echo "#include \"trampoline.h\""
        for n in $names; do echo "EMU_EXPORT($n)"; done
    } >"$tmp/mod_$stem.cpp"
    g++ "${flags[@]}" -shared -o "$out/modules/$stem.so" "$tmp/mod_$stem.cpp" &
    pids+=($!)
done
g++ -std=c++20 -O2 -fPIC -shared -w -I "$inc" -o "$out/libcuda.so" "$here/device.cpp" -ldl &
pids+=($!)
for p in "${pids[@]}"; do wait "$p"; done
ln -sf libcuda.so "$out/libcuda.so.1"
