#!/usr/bin/env bash
# Per-kernel GPU time of one benchmark run, on the lent GPU machine (binaries carried in .gpu/,
# built by scripts/build-gpu-bundle.sh). Uses Nsight Systems when the machine has it (kernel
# times inside CUDA graphs with --cuda-graph-trace=node), else Nsight Compute. Writes the
# per-kernel summaries to $OUT. Usage: `bash scripts/gpu-profile.sh [bench args...]`.
set -u
B=.gpu
OUT=${OUT:-$B/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export THINKSTEER_CUDA_INCLUDE=/usr/local/cuda/include
PATH=$PATH:/usr/local/cuda/bin:$(ls -d /opt/nvidia/nsight-systems/*/bin 2>/dev/null | tail -1)
ARGS=${*:-"--shape qwen2.5-1.5b --device cuda --batch 1 --prompt-len 64 --new-tokens 64"}
NSYS=$(command -v nsys || ls /usr/local/cuda/nsight-systems*/bin/nsys 2>/dev/null | head -1)
NCU=$(command -v ncu || ls /usr/local/cuda/nsight-compute*/ncu 2>/dev/null | head -1)
echo "nsys: ${NSYS:-none}  ncu: ${NCU:-none}"
if [ -n "$NSYS" ]; then
    "$NSYS" profile --trace=cuda --cuda-graph-trace=node --force-overwrite true -o "$OUT/prof" \
        "$B/thinksteer" bench $ARGS > "$OUT/prof-run.log" 2>&1
    tail -5 "$OUT/prof-run.log"
    "$NSYS" stats --report cuda_gpu_kern_sum --format csv "$OUT/prof.nsys-rep" > "$OUT/kern-sum.csv" 2>/dev/null
    "$NSYS" stats --report cuda_gpu_trace --format csv "$OUT/prof.nsys-rep" > "$OUT/kern-trace.csv" 2>/dev/null
    rm -f "$OUT/prof.nsys-rep" "$OUT/prof.sqlite"
    head -30 "$OUT/kern-sum.csv" | cut -c1-200
elif [ -n "$NCU" ]; then
    timeout 400 "$NCU" --metrics gpu__time_duration.sum --csv --launch-skip "${SKIP:-3000}" --launch-count "${COUNT:-400}" \
        "$B/thinksteer" bench $ARGS > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
    tail -3 "$OUT/ncu.err"; wc -l "$OUT/ncu.csv"
else
    echo "neither nsys nor ncu here"; ls /usr/local/cuda/bin
fi
