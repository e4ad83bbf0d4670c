// check.cpp: the emulator's one binary. Runs the kernels of kernels/*.cu in the CPU emulator
// (emulate.h) against plain double-precision references written from each kernel file's banner
// formula, launched with the grid, block and dynamic shared memory src/cuda/kernels.rs uses.
// One check_<family>.cpp per kernel family (bounds and cases are explained there):
//   check_prefill_gemm.cpp  prefill_attention.cu, gemm.cu (with and without a live row count)
//   check_grad.cpp          grad.cu's attention forward/backward and vg_mm products
//   check_grad_small.cpp    grad.cu's other kernels: vg_rmsnorm_*, vg_rope, vg_silu_mul_*,
//                           vg_xent, vg_rows, vg_steer_rows (run last: the earlier checks keep
//                           their random inputs)
//   check_gemv.cpp          gemv.cu: every bucket, the glu, _norm, _acc and _glu_norm variants;
//                           the buckets also with a live row count and row0
//   check_attention.cpp     attention.cu: both decode kernels, several splits, Dh 64 and 128,
//                           with and without a live row count
//   check_residual.cpp      residual_norm.cu: residual + steering add, RMSNorm, SAE encode
//   check_rope.cpp          rope.cu: bias, RoPE (plain and llama3-scaled inv_freq), cache append
//   check_small.cpp         embed.cu, elementwise.cu, sampling.cu, hybrid.cu, random.cu
//                           (silu_mul and argmax also with a live row count)
//   check_gate.cpp          hybrid.cu's gate-first step: hybrid_gate_i32,
//                           hybrid_expand_compact_f32, hybrid_select_compact_i32, and
//                           hybrid_gather_f32 with cidx (after check_small.cpp: hybrid.cu)
// Prints one line per checked output ending in `ok` or `FAIL`; exits 1 when any fails.
#include <cstdio>

#include "check_util.h"
#include "check_prefill_gemm.cpp"
#include "check_grad.cpp"
#include "check_gemv.cpp"
#include "check_attention.cpp"
#include "check_residual.cpp"
#include "check_rope.cpp"
#include "check_small.cpp"
#include "check_gate.cpp"
#include "check_grad_small.cpp"

int main() {
    run_prefill_gemm();
    run_grad();
    run_gemv();
    run_attention();
    run_residual();
    run_rope();
    run_small();
    run_gate();
    run_grad_small();
    return failures ? 1 : 0;
}
