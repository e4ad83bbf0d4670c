#!/usr/bin/env bash
# GPU check: run on the lent GPU machine (no cargo there) from the repository root, with the
# binaries built here and carried in .gpu/ (see scripts/build-gpu-bundle.sh). Runs the GPU tests,
# then `thinksteer bench` for the Qwen2.5-1.5B and Llama-3.1-8B shapes, then the HF anchor
# (a copy of ../shared/bench/hf_anchor.py) in the same call, and prints a summary table last.
# Full logs go to $OUT (or .gpu/out). Budget: well under 8 minutes on an H100.
# Short runs: TESTS="cuda_vector_grad ..." runs only those test binaries; BENCH=vg runs only the
# vector-gradient bench (with THINKSTEER_CUDA_PROFILE=1: a per-kernel breakdown); SKIP_HF=1.
# PHASE=1: the tests, the benches and profiles, the HF anchor, the summary; PHASE=2: the A/B lines
# (RoPE in attention, gemv warps, gate first, one stream, gemm choices, prefill chunk, grouped
# attention, kernel bench). Each
# phase fits one 10-minute device call (phase 1 with SKIP_HF=1); the default runs both.
set -u
B=.gpu
OUT=${OUT:-$B/out}
mkdir -p "$OUT"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export THINKSTEER_CUDA_INCLUDE=/usr/local/cuda/include
# Kernels compiled by scripts/build-gpu-bundle.sh (sm_90): no process here compiles them again.
export THINKSTEER_KERNEL_CACHE=${THINKSTEER_KERNEL_CACHE:-$PWD/$B/kernel-cache}
NEW=${NEW:-256}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
echo "kernel cache: $(ls "$THINKSTEER_KERNEL_CACHE" 2>/dev/null | wc -l) cubins in $THINKSTEER_KERNEL_CACHE"

PHASE=${PHASE:-all}
one() { [ "$PHASE" = all ] || [ "$PHASE" = 1 ]; }
two() { [ "$PHASE" = all ] || [ "$PHASE" = 2 ]; }
status=0
# A filtered command's exit status, said when it is not 0 (a timeout or a panic prints no table).
exited() { [ "$1" = 0 ] || echo "  (exit $1$([ "$1" = 124 ] && echo ": timed out"))" | tee -a "$2"; }
for t in "$B"/tests/*; do
    one || break
    name=$(basename "$t")
    case " ${TESTS:-$name} " in *" $name "*) ;; *) continue ;; esac
    echo "== test $name"
    if timeout 180 "$t" --test-threads=1 > "$OUT/test-$name.log" 2>&1; then
        grep -E "^test result" "$OUT/test-$name.log"
    else
        status=1
        echo "FAILED: $name"; tail -40 "$OUT/test-$name.log"
    fi
done

if [ "${BENCH:-all}" = "all" ] && one; then
echo "== bench"
timeout 150 "$B/thinksteer" bench --shape qwen2.5-1.5b --device cuda --batch 1,8,64 --prompt-len 64 --new-tokens "$NEW" --json > "$OUT/bench-qwen.jsonl" 2> "$OUT/bench-qwen.err" || { status=1; cat "$OUT/bench-qwen.err"; }
timeout 150 "$B/thinksteer" bench --shape llama-3.1-8b --device cuda --batch 1,8 --prompt-len 64 --new-tokens "$NEW" --json > "$OUT/bench-llama.jsonl" 2> "$OUT/bench-llama.err" || { status=1; cat "$OUT/bench-llama.err"; }
timeout 120 "$B/thinksteer" bench --shape qwen2.5-1.5b --device cuda --batch 1 --prompt-len 2000 --new-tokens 32 --json > "$OUT/bench-qwen-2k.jsonl" 2> "$OUT/bench-qwen-2k.err" || { status=1; cat "$OUT/bench-qwen-2k.err"; }
timeout 150 "$B/thinksteer" bench --hybrid --shape qwen2.5-1.5b --device cuda --batch 1,8,64 --new-tokens "$NEW" --json > "$OUT/bench-hybrid.jsonl" 2> "$OUT/bench-hybrid.err" || {
    status=1; cat "$OUT/bench-hybrid.err"
    # Still time the step as run 13 did (one stream, single pass) so the call is not wasted.
    echo "== retry: THINKSTEER_HYBRID_STREAMS=1 THINKSTEER_GATE_FIRST=0"
    THINKSTEER_HYBRID_STREAMS=1 THINKSTEER_GATE_FIRST=0 timeout 150 "$B/thinksteer" bench --hybrid --shape qwen2.5-1.5b --device cuda --batch 1,8,64 --new-tokens "$NEW" --json > "$OUT/bench-hybrid.jsonl" 2>> "$OUT/bench-hybrid.err" || tail -5 "$OUT/bench-hybrid.err"
}
fi
if [ "${THINKSTEER_CUDA_PROFILE:-0}" = "1" ] && one; then
    echo "== per-kernel profiles (one eager prefill / decode step / hybrid step each)"
    cat "$OUT"/bench-qwen.err "$OUT"/bench-qwen-2k.err "$OUT"/bench-hybrid.err 2>/dev/null | grep -A8 "^profile" | grep -v "^--"
fi
# The steering-vector gradient (train-vectors --method optimise's work) at 500-token contexts.
if one; then
echo "== bench --vector-grad"
THINKSTEER_CUDA_PROFILE=0 timeout 120 "$B/thinksteer" bench --vector-grad --shape qwen2.5-1.5b --prompt-len 500 --device cuda 2>&1 | tail -6
if [ "${THINKSTEER_CUDA_PROFILE:-0}" = "1" ]; then
    timeout 120 "$B/thinksteer" bench --vector-grad --shape qwen2.5-1.5b --prompt-len 500 --device cuda --json > "$OUT/vg-profile.jsonl" 2>&1
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
# A/B lines, most important first (a call cut short by its limit still has those): each runs
# `thinksteer bench` with the switches given before the arguments (see README, GPU switches).
ab() {
    local vars="$1"; shift
    echo "== $vars bench $*" | tee -a "$OUT/ab.log"
    env THINKSTEER_CUDA_PROFILE=0 $vars timeout 150 "$B/thinksteer" bench --shape qwen2.5-1.5b --device cuda "$@" 2>&1 | grep -E " cuda |^ +x[0-9]|rror|panicked" | tee -a "$OUT/ab.log"
    exited "${PIPESTATUS[0]}" "$OUT/ab.log"
}
H="--hybrid --steered-share 0.125 --new-tokens $NEW"
# 0. Bias + RoPE + K/V append inside decode attention (one launch per block fewer), batch 1 and 64
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
echo "== THINKSTEER_ROPE=attn llama-3.1-8b batch 1"
THINKSTEER_CUDA_PROFILE=0 THINKSTEER_ROPE=attn timeout 150 "$B/thinksteer" bench --shape llama-3.1-8b --device cuda --batch 1 --prompt-len 64 --new-tokens "$NEW" 2>&1 | grep -E " cuda |rror|panicked" | tee -a "$OUT/ab.log"; exited "${PIPESTATUS[0]}" "$OUT/ab.log"
# 1. The hybrid step at about the paper's share of steered steps: single pass vs gate first, two
#    streams vs one, and 33–128-row products through gemm (split K) or cuBLASLt.
ab "THINKSTEER_GATE_FIRST=0" $H --batch 8,64
ab "THINKSTEER_GATE_FIRST=1" $H --batch 8,64
#    At batch 1 a problem is steered at every step or at none: gate first costs t0 + f·(t1 − t0)
#    at a steered fraction f (t0, t1: the lines with share 0 and 1), the single pass the same at
#    any f.
ab "THINKSTEER_GATE_FIRST=0" --hybrid --steered-share 0 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GATE_FIRST=1" --hybrid --steered-share 0 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GATE_FIRST=1" --hybrid --steered-share 1 --new-tokens "$NEW" --batch 1
ab "THINKSTEER_HYBRID_STREAMS=1" --hybrid --new-tokens "$NEW" --batch 1
ab "THINKSTEER_GEMM_FROM=33" $H --batch 64
ab "THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=lt" $H --batch 64
ab "THINKSTEER_GEMM_FROM=33" --batch 64 --prompt-len 64 --new-tokens "$NEW"
ab "THINKSTEER_GEMM_FROM=33 THINKSTEER_GEMM=lt" --batch 64 --prompt-len 64 --new-tokens "$NEW"
# 2. Prefill of 2,000 tokens: cuBLASLt, the 128-row tile, one 2,048-row call.
ab "THINKSTEER_GEMM=lt" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_GEMM=128" --batch 1 --prompt-len 2000 --new-tokens 8
ab "THINKSTEER_GEMM=64" --batch 1 --prompt-len 2000 --new-tokens 8 --chunk 2048
ab "THINKSTEER_GEMM=lt" --batch 1 --prompt-len 2000 --new-tokens 8 --chunk 2048
# 3. Long contexts: decode attention per head vs per GQA group (batch 1 at 2,000 tokens; the
#    batch-64 hybrid step at 1,000-token contexts).
ab "THINKSTEER_ATTN=head" --batch 1 --prompt-len 2000 --new-tokens 32
ab "THINKSTEER_ATTN=group" --batch 1 --prompt-len 2000 --new-tokens 32
ab "THINKSTEER_ATTN=head" --hybrid --steered-share 0.125 --batch 64 --prompt-len 1000 --new-tokens 64
ab "THINKSTEER_ATTN=group" --hybrid --steered-share 0.125 --batch 64 --prompt-len 1000 --new-tokens 64
# 4. The large products alone with each gemm kernel (ours at 64 / 128 rows, cuBLASLt).
if [ -x "$B/kernel-bench" ]; then
    echo "== kernel bench: gemm"
    timeout 120 "$B/kernel-bench" --bench gemm 2>&1 | grep -E "^gemm .*(TFLOP|skipped)"
fi
fi

summary() {
echo "== summary ($(head -1 "$OUT/gpu.txt"))$1"
python3 - "$OUT" <<'PY'
import json, sys, os, re
out = sys.argv[1]
rows = []
for f in ("bench-qwen.jsonl", "bench-llama.jsonl", "bench-qwen-2k.jsonl", "bench-hybrid.jsonl"):
    p = os.path.join(out, f)
    if os.path.exists(p):
        rows += [json.loads(l) for l in open(p) if l.strip()]
hf = {}
p = os.path.join(out, "hf.log")
if os.path.exists(p):
    for l in open(p):
        if l.startswith("RESULTS "):
            hf = json.loads(l[8:])
# The HF anchor's row for our batch-1 rows (same call): plain generate and the two-model loop.
peer = {("qwen2.5-1.5b", "decode"): "hf_generate_qwen1.5b",
        ("llama-3.1-8b", "decode"): "hf_generate_llama8b",
        ("qwen2.5-1.5b pair", "hybrid"): "hf_hybrid_loop_qwen1.5b_x2"}
print(f"{'shape':<19} {'phase':<8} {'batch':>5} {'tokens':>6} {'ms/token':>9} {'tok/s':>9} {'GB/s':>7} {'% floor':>8} {'vs plain':>8} {'steered':>7} {'vs HF':>7}")
for r in rows:
    pct = f"{r['pct_of_floor']:.1f}%" + ("TC" if r["phase"] == "prefill" else "")
    ratio = f"x{r['ratio_to_plain']:.3f}" if r.get("ratio_to_plain") else ""
    steered = f"{100 * r['steered_fraction']:.1f}%" if r.get("steered_fraction") is not None else ""
    name = peer.get((r["shape"], r["phase"])) if r["batch"] == 1 and r["tokens"] > 32 else None
    vs_hf = f"{r['tok_per_s'] / hf[name]:.1f}x" if name and hf.get(name) else ""
    print(f"{r['shape']:<19} {r['phase']:<8} {r['batch']:>5} {r['tokens']:>6} {r['ms_per_token']:>9.3f} {r['tok_per_s']:>9.1f} {r['gb_per_s']:>7.0f} {pct:>8} {ratio:>8} {steered:>7} {vs_hf:>7}")
if hf:
    print("HF anchor (same call):", json.dumps(hf))
PY
}
# The table once before the HF anchor (so a call cut short by its limit still prints it), and
# again after it with the speed-ups over its rows. The --marginal tables (diagnostic) come last.
summary ""
# The HF anchor runs in the same call as the benches it is compared with (phase 1).
if [ "${SKIP_HF:-0}" != "1" ] && [ -f "$B/hf_anchor.py" ] && one; then
    echo "== HF anchor (NEW=$NEW)"
    NEW=$NEW PYTHONUNBUFFERED=1 timeout 240 python3 "$B/hf_anchor.py" > "$OUT/hf.log" 2>&1 || echo "hf_anchor failed: $(tail -3 "$OUT/hf.log")"
    summary ", with the HF anchor"
fi

# What each kind of launch of a decode step costs inside the replayed graph (left out in turn).
if [ "${BENCH:-all}" = "all" ] && one; then
    echo "== bench --marginal (each kind of launch left out in turn; times only)"
    THINKSTEER_CUDA_PROFILE=0 timeout 150 "$B/thinksteer" bench --shape qwen2.5-1.5b --device cuda --batch 1,64 --prompt-len 64 --new-tokens 64 --marginal 2>&1 | grep -E "^(marginal|  )|rror|panicked" | tee -a "$OUT/marginal.log"; exited "${PIPESTATUS[0]}" "$OUT/marginal.log"
    THINKSTEER_CUDA_PROFILE=0 timeout 100 "$B/thinksteer" bench --shape llama-3.1-8b --device cuda --batch 1 --prompt-len 64 --new-tokens 64 --marginal 2>&1 | grep -E "^(marginal|  )|rror|panicked" | tee -a "$OUT/marginal.log"; exited "${PIPESTATUS[0]}" "$OUT/marginal.log"
    THINKSTEER_CUDA_PROFILE=0 timeout 120 "$B/thinksteer" bench --hybrid --shape qwen2.5-1.5b --device cuda --batch 1 --new-tokens 64 --marginal 2>&1 | grep -E "^(marginal|  )|rror|panicked" | tee -a "$OUT/marginal.log"; exited "${PIPESTATUS[0]}" "$OUT/marginal.log"
fi

# Cubins written during this call: the driver refused a shipped one (or none was shipped) and
# the kernels were compiled here.
echo "kernel cache: $(find "$THINKSTEER_KERNEL_CACHE" -name '*.cubin' -newer "$OUT/gpu.txt" 2>/dev/null | wc -l) cubins compiled during this call"
exit $status
