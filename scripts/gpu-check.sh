#!/usr/bin/env bash
# GPU check: run on the lent GPU machine (no cargo there) from the repository root, with the
# binaries built here and carried in .gpu/ (see scripts/build-gpu-bundle.sh). Runs the GPU tests,
# then `thinksteer bench` for the Qwen2.5-1.5B and Llama-3.1-8B shapes, then the HF anchor
# (a copy of ../shared/bench/hf_anchor.py) in the same call, and prints a summary table last.
# Full logs go to $OUT (or .gpu/out). Budget: well under 8 minutes on an H100 or H200.
# Short runs: TESTS="cuda_vector_grad ..." runs only those test binaries; BENCH=vg runs only the
# vector-gradient bench (with THINKSTEER_CUDA_PROFILE=1: a per-kernel breakdown); SKIP_HF=1.
# PHASE=1: the tests, the benches and profiles, the HF anchor, the summary; PHASE=2: the engine's
# GPU tests with the switches' other values (a value whose tests fail is never chosen), the kernel
# bench of the large products, then the A/B lines (gemm choices and prefill chunk, RoPE in
# attention, gemv warps, gate first, one stream, grouped attention) until AB_FOR seconds
# (default 390) from the phase's start, then scripts/gpu-ab.py chooses each switch from them
# and the summary benches run again with the chosen switches. Each
# phase fits one 10-minute device call (phase 1 with SKIP_HF=1); the default runs both. Section
# headers say the seconds since the start, so the next call can be sized.
# Dry run (scripts/cuda-emulate/gpu-check-dry.sh): B names the bundle folder, QWEN and LLAMA
# the shapes benched in place of qwen2.5-1.5b and llama-3.1-8b, BEST the switches of phase 2's
# summary benches in place of the chooser's, TIMEOUT_SCALE a factor on every command's limit.
set -u
TS=${TIMEOUT_SCALE:-1}
[[ $TS =~ ^[1-9][0-9]*$ ]] || { echo "TIMEOUT_SCALE: expected a whole number ≥ 1, found '$TS'" >&2; exit 2; }
B=${B:-.gpu}
QWEN=${QWEN:-qwen2.5-1.5b}
LLAMA=${LLAMA:-llama-3.1-8b}
OUT=${OUT:-$B/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export THINKSTEER_CUDA_INCLUDE=/usr/local/cuda/include
# A GPU test that finds no usable device fails instead of printing "skipped".
export THINKSTEER_EXPECT_GPU=1
# The binaries embed the kernels as sm_90 cubins (scripts/build-gpu-bundle.sh); what a process
# here must still compile (none, unless the driver refuses those cubins) is cached for the next.
case $B in /*) kc=$B/kernel-cache ;; *) kc=$PWD/$B/kernel-cache ;; esac
export THINKSTEER_KERNEL_CACHE=${THINKSTEER_KERNEL_CACHE:-$kc}
NEW=${NEW:-256}
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
else
    echo "no nvidia-smi (the emulated driver?)" | tee "$OUT/gpu.txt"
fi
echo "kernel cache: $(ls "$THINKSTEER_KERNEL_CACHE" 2>/dev/null | wc -l) cubins in $THINKSTEER_KERNEL_CACHE"

PHASE=${PHASE:-all}
one() { [ "$PHASE" = all ] || [ "$PHASE" = 1 ]; }
two() { [ "$PHASE" = all ] || [ "$PHASE" = 2 ]; }
status=0
: > "$OUT/failures.txt"
# A failure: the call's exit status becomes 1, and the line goes to $OUT/failures.txt (listed at
# the end).
failed() { status=1; echo "$*" >> "$OUT/failures.txt"; }
section() { echo "== $* [${SECONDS}s]"; }
# A filtered command's exit status, said when it is not 0 (a timeout or a panic prints no table).
exited() { [ "$1" = 0 ] || echo "  (exit $1$([ "$1" = 124 ] && echo ": timed out"))" | tee -a "$2"; }
for t in "$B"/tests/*; do
    one || break
    name=$(basename "$t")
    case " ${TESTS:-$name} " in *" $name "*) ;; *) continue ;; esac
    section "test $name"
    if timeout $((180 * TS)) "$t" --test-threads=1 > "$OUT/test-$name.log" 2>&1; then
        grep -E "^test result" "$OUT/test-$name.log"
    else
        failed "test $name"
        echo "FAILED: $name"; tail -40 "$OUT/test-$name.log"
    fi
done

if [ "${BENCH:-all}" = "all" ] && one; then
section "bench"
timeout $((150 * TS)) "$B/thinksteer" bench --shape $QWEN --device cuda --batch 1,8,64 --prompt-len 64 --new-tokens "$NEW" --json > "$OUT/bench-qwen.jsonl" 2> "$OUT/bench-qwen.err" || { failed "bench $QWEN"; cat "$OUT/bench-qwen.err"; }
timeout $((150 * TS)) "$B/thinksteer" bench --shape $LLAMA --device cuda --batch 1,8 --prompt-len 64 --new-tokens "$NEW" --json > "$OUT/bench-llama.jsonl" 2> "$OUT/bench-llama.err" || { failed "bench $LLAMA"; cat "$OUT/bench-llama.err"; }
timeout $((120 * TS)) "$B/thinksteer" bench --shape $QWEN --device cuda --batch 1 --prompt-len 2000 --new-tokens 32 --json > "$OUT/bench-qwen-2k.jsonl" 2> "$OUT/bench-qwen-2k.err" || { failed "bench $QWEN 2k prefill"; cat "$OUT/bench-qwen-2k.err"; }
timeout $((150 * TS)) "$B/thinksteer" bench --hybrid --shape $QWEN --device cuda --batch 1,8,64 --new-tokens "$NEW" --json > "$OUT/bench-hybrid.jsonl" 2> "$OUT/bench-hybrid.err" || {
    failed "bench --hybrid"; cat "$OUT/bench-hybrid.err"
    # Still time the step as run 13 did (one stream, single pass) so the call is not wasted.
    echo "== retry: THINKSTEER_HYBRID_STREAMS=1 THINKSTEER_GATE_FIRST=0"
    THINKSTEER_HYBRID_STREAMS=1 THINKSTEER_GATE_FIRST=0 timeout $((150 * TS)) "$B/thinksteer" bench --hybrid --shape $QWEN --device cuda --batch 1,8,64 --new-tokens "$NEW" --json > "$OUT/bench-hybrid.jsonl" 2>> "$OUT/bench-hybrid.err" || tail -5 "$OUT/bench-hybrid.err"
}
# The paper's windows on the host-driven loop (rows "hybrid-w"): batch 1 steers nearly every
# step, batch 8 about one problem in eight.
timeout $((120 * TS)) "$B/thinksteer" bench --hybrid --shape $QWEN --device cuda --batch 1,8 --steered-share 0.125 --windows 0,-1,-15,-50,-100 --prompt-len 200 --new-tokens 16 --json > "$OUT/bench-hybrid-windows.jsonl" 2> "$OUT/bench-hybrid-windows.err" || { failed "bench --hybrid --windows"; tail -5 "$OUT/bench-hybrid-windows.err"; }
fi
if [ "${THINKSTEER_CUDA_PROFILE:-0}" = "1" ] && one; then
    section "per-kernel profiles (one eager prefill / decode step / hybrid step each)"
    cat "$OUT"/bench-qwen.err "$OUT"/bench-qwen-2k.err "$OUT"/bench-hybrid.err 2>/dev/null | grep -A8 "^profile" | grep -v "^--"
fi
# The steering-vector gradient (train-vectors --method optimise's work) at 500-token contexts.
if one; then
section "bench --vector-grad"
THINKSTEER_CUDA_PROFILE=0 timeout $((120 * TS)) "$B/thinksteer" bench --vector-grad --shape $QWEN --prompt-len 500 --device cuda 2>&1 | tail -6
rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || failed "bench --vector-grad"; exited "$rc" "$OUT/vg.log"
if [ "${THINKSTEER_CUDA_PROFILE:-0}" = "1" ]; then
    timeout $((120 * TS)) "$B/thinksteer" bench --vector-grad --shape $QWEN --prompt-len 500 --device cuda --json > "$OUT/vg-profile.jsonl" 2>&1
    rc=$?; [ "$rc" = 0 ] || failed "bench --vector-grad (profile)"; exited "$rc" "$OUT/vg.log"
    python3 - "$OUT/vg-profile.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    if not l.startswith("{"):
        print(l.rstrip()); continue
    r = json.loads(l)
    print(f"profile, targets {r['targets_at']} ({r['active_rows']} active rows), synchronised per launch:")
    for k, n, ms in r["profile"][:14]:
        print(f"  {k:<22} {n:>5} launches {ms:>9.2f} ms")
PY
fi
fi
if [ "${BENCH:-all}" = "all" ] && two; then
# The engine's GPU tests with the switches' other values, so that no value is chosen below on
# its speed whose results were not checked in the same call (phase 1 tests the defaults): the
# values in groups (one per gemm tile), and when a group fails each of its values alone; a value
# that fails alone goes to $OUT/untrusted.env, which gpu-ab.py choose never picks from.
ab_start=$SECONDS
section "GPU tests with the switches' other values"
: > "$OUT/untrusted.env"
switch_tests() {
    local t
    for t in cuda_model cuda_hybrid; do
        [ -x "$B/tests/$t" ] || continue
        env $1 timeout $((120 * TS)) "$B/tests/$t" --test-threads=1 > "$OUT/switch-$t.log" 2>&1 || {
            grep -E "panicked|FAILED|rror" "$OUT/switch-$t.log" | head -4; return 1; }
    done
}
G="THINKSTEER_GEMM_FROM=33"
for group in "$G THINKSTEER_GEMM=wg THINKSTEER_GEMV_WARPS=8 THINKSTEER_GEMV_ROWS=64 THINKSTEER_ROPE=attn THINKSTEER_ATTN=group THINKSTEER_PREFILL_ROWS=2048 THINKSTEER_RUN_ATTN=decode THINKSTEER_GATE_FIRST=1 THINKSTEER_HYBRID_STREAMS=1" \
    "$G THINKSTEER_GEMM=wg256 THINKSTEER_GATE_FIRST=0" "$G THINKSTEER_GEMM=lt" "$G THINKSTEER_GEMM=128"; do
    if switch_tests "$group"; then
        echo "  passed: $group"
        continue
    fi
    echo "  FAILED: $group; each value alone:"
    failed "GPU tests with $group"
    alone_failed=0
    for v in $group; do
        case $v in THINKSTEER_GEMM=*) alone="$G $v" ;; *) alone=$v ;; esac
        if switch_tests "$alone"; then echo "    passed: $alone"; else
            echo "    FAILED: $alone"; echo "$v" >> "$OUT/untrusted.env"; alone_failed=1; fi
    done
    # Each passed alone: the values fail together, and none can be told apart.
    [ "$alone_failed" = 1 ] || printf '%s\n' $group >> "$OUT/untrusted.env"
done
# The large products alone with each gemm kernel (ours at 64 / 128 rows, the warpgroup kernels at
# 128 / 256 columns, cuBLASLt), first: the one direct measurement of the wgmma kernels (~1 min).
if [ -x "$B/kernel-bench" ]; then
    section "kernel bench: gemm"
    timeout $((120 * TS)) "$B/kernel-bench" --bench gemm 2>&1 | grep -E "^gemm.*(TFLOP|skipped)"
fi
# A/B lines, most important first (a call cut short by its limit still has those): each runs
# `thinksteer bench` with the switches given before the arguments (see README, GPU switches).
SHAPE=$QWEN
ab() {
    local vars="$1"; shift
    if [ $((SECONDS - ab_start)) -gt "${AB_FOR:-390}" ]; then
        echo "== skipped (A/B time of ${AB_FOR:-390}s spent): $vars $SHAPE $*" | tee -a "$OUT/ab.log"
        return
    fi
    section "$vars bench --shape $SHAPE $*" | tee -a "$OUT/ab.log"
    env THINKSTEER_CUDA_PROFILE=0 $vars timeout $((150 * TS)) "$B/thinksteer" bench --shape "$SHAPE" --device cuda --json "$@" 2> "$OUT/ab.err" |
        python3 scripts/gpu-ab.py record "$OUT" "$vars" "$SHAPE" "$@" | tee -a "$OUT/ab.log"
    local rc=${PIPESTATUS[0]}
    grep -E "rror|panicked|no wgmma" "$OUT/ab.err" | head -5 | tee -a "$OUT/ab.log"
    exited "$rc" "$OUT/ab.log"
}
H="--hybrid --steered-share 0.125 --new-tokens $NEW"
# 0. Prefill of 2,000 tokens (issue 3's farthest target): the warpgroup (wgmma) products with 128
#    or 256 columns per block, cuBLASLt, the 128-row tile, one 2,048-row call (the default prefill
#    line, with 512-row calls, is the ATTN=head line of section 3; short lines, so they go first).
#    At 512-row calls a 128-row tile leaves most SMs idle on the 1,536- and 2,048-wide products
#    (48 and 64 blocks), hence the 2,048-row lines with each wide tile.
ab "THINKSTEER_GEMM=wg" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_GEMM=wg256" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_GEMM=lt" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_GEMM=128" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_PREFILL_ROWS=2048" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_PREFILL_ROWS=2048 THINKSTEER_GEMM=wg256" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_PREFILL_ROWS=2048 THINKSTEER_GEMM=wg" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_PREFILL_ROWS=2048 THINKSTEER_GEMM=lt" --batch 1 --prompt-len 2000 --new-tokens 8
# 1. Bias + RoPE + K/V append inside decode attention (one launch per block fewer), batch 1 and 64
#    of both shapes and the batch-1 hybrid step, against the default in the same call.
ab "THINKSTEER_ROPE=separate" --batch 1,64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_ROPE=attn" --batch 1,64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_ROPE=separate" --hybrid --new-tokens "$NEW" --batch 1
ab "THINKSTEER_ROPE=attn" --hybrid --new-tokens "$NEW" --batch 1
#    ... and at 1,000-token contexts, where each of 16 splits per head rotates its queries again.
ab "THINKSTEER_ROPE=separate" --batch 64 --prompt-len 1000 --new-tokens 64
ab "THINKSTEER_ROPE=attn" --batch 64 --prompt-len 1000 --new-tokens 64
#    8-warp blocks for the 9–32-row gemv buckets (the batch-1 hybrid step's 11 rows after the
#    steering point, batch 16, and batch 64's two 32-row groups).
ab "THINKSTEER_GEMV_WARPS=8" --hybrid --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GEMV_WARPS=16" --batch 16,64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_GEMV_WARPS=8" --batch 16,64 --prompt-len 64 --new-tokens "$NEW"
#    The 64-row gemv bucket (weights read once for 64 rows instead of once per 32-row group).
ab "THINKSTEER_GEMV_ROWS=64" --batch 64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_GEMV_ROWS=64 THINKSTEER_GEMV_WARPS=8" --batch 64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_GEMV_ROWS=64" $H --batch 8,64
SHAPE=$LLAMA ab "THINKSTEER_ROPE=separate" --batch 1 --prompt-len 64 --new-tokens "$NEW"
SHAPE=$LLAMA ab "THINKSTEER_ROPE=attn" --batch 1 --prompt-len 64 --new-tokens "$NEW"
# 2. The hybrid step at about the paper's share of steered steps: single pass vs gate first, two
#    streams vs one, and 33–128-row products through gemm (split K) or cuBLASLt.
ab "THINKSTEER_GATE_FIRST=0" $H --batch 8,64
ab "THINKSTEER_GATE_FIRST=1" $H --batch 8,64
#    At batch 1 a problem is steered at every step or at none: gate first costs t0 + f·(t1 − t0)
#    at a steered fraction f (t0, t1: the lines with share 0 and 1), the single pass the same at
#    any f.
ab "THINKSTEER_GATE_FIRST=0" --hybrid --steered-share 0 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GATE_FIRST=1" --hybrid --steered-share 0 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GATE_FIRST=0" --hybrid --steered-share 1 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GATE_FIRST=1" --hybrid --steered-share 1 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_HYBRID_STREAMS=1" --hybrid --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GEMM_FROM=33" $H --batch 64
ab "THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=lt" $H --batch 64
ab "THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=wg" $H --batch 64
#    (cuBLASLt at the default GEMM_FROM: the candidate rows of the gate-first pass and prefill)
ab "THINKSTEER_GEMM=lt" $H --batch 64
ab "THINKSTEER_GEMM_FROM=33" --batch 64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=lt" --batch 64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=wg" --batch 64 --prompt-len 64 --new-tokens "$NEW"
# 3. Long contexts: decode attention per head vs per GQA group (batch 1 at 2,000 tokens; the
#    batch-64 hybrid step at 1,000-token contexts).
ab "THINKSTEER_ATTN=head" --batch 1 --prompt-len 2000 --new-tokens 32
ab "THINKSTEER_ATTN=group" --batch 1 --prompt-len 2000 --new-tokens 32
ab "THINKSTEER_ATTN=head" --hybrid --steered-share 0.125 --batch 64 --prompt-len 1000 --new-tokens 64
ab "THINKSTEER_ATTN=group" --hybrid --steered-share 0.125 --batch 64 --prompt-len 1000 --new-tokens 64
#    The paper's windows: candidate runs' attention on the prefill tiles vs the decode kernels.
W="--hybrid --windows 0,-1,-15,-50,-100 --batch 1 --prompt-len 200 --new-tokens 16"
ab "THINKSTEER_RUN_ATTN=tiles" $W
ab "THINKSTEER_RUN_ATTN=decode" $W
#    ... and without the window-0 prefix caches (each window-0 candidate reruns the sequence).
ab "THINKSTEER_RUN_ATTN=tiles" $W --prefix-caches 0
#    ... and with both models' decode steps on one stream (one after the other).
ab "THINKSTEER_HYBRID_STREAMS=1" $W
# 4. Each switch chosen from the lines above (the non-default value only where it is faster on
#    the geometric mean of its pairs and slower on none), then the summary benches again with
#    the chosen switches, in the same call as the lines they are compared with.
section "choice of switches (scripts/gpu-ab.py)"
python3 scripts/gpu-ab.py choose "$OUT" | tee "$OUT/choose.log"
best=${BEST:-$(cat "$OUT/best.env" 2>/dev/null)}
if [ -n "$best" ]; then
    section "summary benches with: $best"
    # Recorded like the A/B lines (into $OUT/best), so compare can pair them with the default rows.
    mkdir -p "$OUT/best"
    bb() {
        local shape="$1"; shift
        env THINKSTEER_CUDA_PROFILE=0 $best timeout $((150 * TS)) "$B/thinksteer" bench --shape "$shape" --device cuda --json "$@" 2> "$OUT/best/err" |
            python3 scripts/gpu-ab.py record "$OUT/best" "$best" "$shape" "$@" > /dev/null
        [ "${PIPESTATUS[0]}" = 0 ] || { failed "summary bench with $best: $shape $*"; tail -5 "$OUT/best/err"; }
    }
    bb $QWEN --batch 1,8,64 --prompt-len 64 --new-tokens "$NEW"
    bb $LLAMA --batch 1,8 --prompt-len 64 --new-tokens "$NEW"
    bb $QWEN --batch 1 --prompt-len 2000 --new-tokens 32
    bb $QWEN --hybrid --batch 1,8,64 --new-tokens "$NEW"
    bb $QWEN --hybrid --steered-share 0.125 --batch 64 --new-tokens "$NEW"
    bb $QWEN $W
    python3 scripts/gpu-ab.py summary "$OUT/best" " with $best ($(head -1 "$OUT/gpu.txt"))" ab.jsonl
    python3 scripts/gpu-ab.py compare "$OUT"
fi
fi

summary() {
    python3 scripts/gpu-ab.py summary "$OUT" " ($(head -1 "$OUT/gpu.txt"))$1" bench-qwen.jsonl bench-llama.jsonl bench-qwen-2k.jsonl bench-hybrid.jsonl bench-hybrid-windows.jsonl
}
# The table once before the HF anchor (so a call cut short by its limit still prints it), and
# again after it with the speed-ups over its rows. The --marginal tables (diagnostic) come last.
one && summary ""
# The HF anchor runs in the same call as the benches it is compared with (phase 1).
if [ "${SKIP_HF:-0}" != "1" ] && [ -f "$B/hf_anchor.py" ] && one; then
    section "HF anchor (NEW=$NEW)"
    NEW=$NEW PYTHONUNBUFFERED=1 timeout $((240 * TS)) python3 "$B/hf_anchor.py" > "$OUT/hf.log" 2>&1 || echo "hf_anchor failed: $(tail -3 "$OUT/hf.log")"
    summary ", with the HF anchor"
fi

# What each kind of launch of a decode step costs inside the replayed graph (left out in turn).
if [ "${BENCH:-all}" = "all" ] && one; then
    section "bench --marginal (each kind of launch left out in turn; times only)"
    THINKSTEER_CUDA_PROFILE=0 timeout $((150 * TS)) "$B/thinksteer" bench --shape $QWEN --device cuda --batch 1,64 --prompt-len 64 --new-tokens 64 --marginal 2>&1 | grep -E "^(marginal|  )|rror|panicked" | tee -a "$OUT/marginal.log"; exited "${PIPESTATUS[0]}" "$OUT/marginal.log"
    THINKSTEER_CUDA_PROFILE=0 timeout $((100 * TS)) "$B/thinksteer" bench --shape $LLAMA --device cuda --batch 1 --prompt-len 64 --new-tokens 64 --marginal 2>&1 | grep -E "^(marginal|  )|rror|panicked" | tee -a "$OUT/marginal.log"; exited "${PIPESTATUS[0]}" "$OUT/marginal.log"
    THINKSTEER_CUDA_PROFILE=0 timeout $((120 * TS)) "$B/thinksteer" bench --hybrid --shape $QWEN --device cuda --batch 1 --new-tokens 64 --marginal 2>&1 | grep -E "^(marginal|  )|rror|panicked" | tee -a "$OUT/marginal.log"; exited "${PIPESTATUS[0]}" "$OUT/marginal.log"
fi

# Cubins written during this call: the driver refused a shipped one (or none was shipped) and
# the kernels were compiled here.
echo "kernel cache: $(find "$THINKSTEER_KERNEL_CACHE" -name '*.cubin' -newer "$OUT/gpu.txt" 2>/dev/null | wc -l) cubins compiled during this call"
if [ -s "$OUT/failures.txt" ]; then
    section "failures"
    cat "$OUT/failures.txt"
fi
exit $status
