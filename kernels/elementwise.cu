// elementwise.cu: SiLU(gate)·up.
//
//   out[t, i] = bf16(silu(g) · u),  g = gate_up[t, i], u = gate_up[t, F + i],  silu(g) = g / (1 + e^{−g})
//
// dtypes: gate_up f32 [T, 2F] (the fused gate|up product: gate first), out bf16 [T, F].
// Rounding: f32 throughout (precise expf), one RNE rounding to bf16.
// live (nullable, device): rows t ≥ *live are skipped (see common.cuh live_rows).
// Launch: grid-stride, block 256, grid min(ceil(T·F / 256), 65535).
#include "common.cuh"

extern "C" __global__ void silu_mul_bf16(bf16_t* __restrict__ out, const float* __restrict__ gate_up, int T, int F,
                                         const int* __restrict__ live) {
    pdl_enter();
    const size_t n = (size_t)live_rows(live, T) * F;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
        const size_t t = e / F, i = e % F;
        const float g = gate_up[t * 2 * F + i], u = gate_up[t * 2 * F + F + i];
        out[e] = f2bf(silu_mul(g, u));
    }
}
