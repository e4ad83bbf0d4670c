#!/usr/bin/env bash
# Dry run of scripts/gpu-check.sh (both phases) on the emulated CUDA driver, so that the script,
# the bench flags it passes and scripts/gpu-ab.py (record, choose, summary, compare) run end to
# end here before a lent GPU's minutes are spent on them. Every bench runs the `tiny` shape in
# place of the real ones, through a wrapper that scales its sizes down (batches 1, 8, 16, 64 →
# 1, 2, 3, 4; prompts ≤ 32 tokens; 3 new tokens) the same way in every line, so the A/B rows
# still pair. The times mean nothing; the GPU tests are left to gpu-tests.sh, the kernel bench and
# the HF anchor to the lent card. Fails when the script fails, when a Python traceback or a
# panic shows, or when a table it should print is missing.
# Every command's time limit is 4 times the script's (the emulator is slow). .ci/run runs it.
# Usage: bash scripts/cuda-emulate/gpu-check-dry.sh [DIR holding the thinksteer binary; default
# target/release]. About 16 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
emu="$PWD/target/cuda-emulate"
bash scripts/cuda-emulate/build-device.sh "$emu"
real="$(cd "${1:-target/release}" && pwd)/thinksteer"
[ -x "$real" ] || { echo "gpu-check-dry: no binary at $real (cargo build --release first)" >&2; exit 1; }
B=target/gpu-check-dry
rm -rf "$B" && mkdir -p "$B"
cat > "$B/thinksteer" <<EOF
#!/usr/bin/env python3
import os, sys
SIZES = {"--batch": {"1": "1", "8": "2", "16": "3", "64": "4"}}
args, i = sys.argv[1:], 0
while i < len(args):
    flag = args[i]
    if flag == "--shape":
        args[i + 1] = "tiny"
    elif flag == "--batch":
        args[i + 1] = ",".join(SIZES["--batch"].get(b, "2") for b in args[i + 1].split(","))
    elif flag == "--prompt-len":
        args[i + 1] = str(min(32, max(8, int(args[i + 1]) // 60)))
    elif flag == "--new-tokens":
        args[i + 1] = "3"
    elif flag == "--windows":
        # The prompts hold 8 tokens or more: the windows shrink with them.
        shrink = {"-15": "-3", "-50": "-5", "-100": "-7"}
        args[i + 1] = ",".join(shrink.get(w, w) for w in args[i + 1].split(","))
    i += 1
os.execv("$real", ["$real"] + args)
EOF
chmod +x "$B/thinksteer"
# Stand-ins for the engine's test binaries in phase 2's switch tests (the real ones run in
# gpu-tests.sh): they pass, except cuda_model with cuBLASLt, which the emulated driver lacks; so
# the dry run sees a failing value marked untrusted, and the rest of the logic run.
mkdir -p "$B/tests"
for t in cuda_model cuda_hybrid; do
    cat > "$B/tests/$t" <<'EOF2'
#!/usr/bin/env bash
if [ "$(basename "$0")" = cuda_model ] && [ "${THINKSTEER_GEMM:-}" = lt ]; then
    echo "test gemm ... FAILED (stand-in: no cuBLASLt beside the emulated driver)"; exit 101
fi
echo "test result: ok (stand-in)"
EOF2
    chmod +x "$B/tests/$t"
done
# NVRTC on the library path, as .ci/run puts it (the binary looks for it before it opens a device).
NV=$(python3 -c 'import nvidia, os; print([os.path.join(p, "cu13") for p in nvidia.__path__ if os.path.isdir(os.path.join(p, "cu13"))][0])' 2>/dev/null || true)
out="$B/out"
log="$B/gpu-check.log"
set +e
LD_LIBRARY_PATH="$emu${NV:+:$NV/lib}:${LD_LIBRARY_PATH:-}" B="$B" OUT="$out" QWEN=tiny LLAMA=tiny TESTS=none \
    SKIP_HF=1 AB_FOR=100000 TIMEOUT_SCALE=4 THINKSTEER_CUDA_PROFILE=1 NEW=3 BEST="THINKSTEER_ROPE=attn THINKSTEER_GEMV_WARPS=8" \
    bash scripts/gpu-check.sh 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
fail() { echo "gpu-check-dry: $*" >&2; exit 1; }
# The one failure expected: the stand-in's, with cuBLASLt.
lt="THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=lt"
[ "$rc" = 1 ] || fail "gpu-check.sh exited $rc, expected 1 (the stand-in test's failure with cuBLASLt)"
[ "$(cat "$out/failures.txt")" = "GPU tests with $lt" ] || fail "failures other than expected: $(cat "$out/failures.txt")"
[ "$(cat "$out/untrusted.env")" = "THINKSTEER_GEMM=lt" ] || fail "untrusted.env: $(cat "$out/untrusted.env")"
grep -q "not chosen whatever their times" "$log" || fail "gpu-ab.py choose did not take untrusted.env"
# A failed line, except the cuBLASLt ones (no cuBLASLt beside the emulated driver).
bad=$(awk '/Traceback|panicked/ || (/\(exit [0-9]+/ && prev !~ /libcublasLt could not be loaded/) { print NR": "$0 } { prev = $0 }' "$log")
[ -z "$bad" ] || fail "errors in $log: $bad"
for want in "choice of switches" "summary benches with" "per-kernel profiles" "marginal"; do
    grep -q "$want" "$log" || fail "no '$want' section in $log"
done
[ -f "$out/best.env" ] || fail "no $out/best.env from gpu-ab.py choose"
echo "gpu-check-dry: gpu-check.sh ran end to end on the emulated driver ($log)"
