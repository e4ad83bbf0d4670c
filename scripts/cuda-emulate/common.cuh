// common.cuh for the CPU emulator (scripts/cuda-emulate/run.sh): the helpers of kernels/common.cuh
// written in plain C++ over the emulator's threads (emulate.h). Same names, same results:
// f2bf rounds to nearest even, mma_bf16_16816 is the m16n8k16 product over the documented
// fragment layout (each lane's share gathered through a warp-wide exchange).
#pragma once
#include "emulate.h"

typedef unsigned short bf16_t;

inline float bf2f(bf16_t v) { return as_float(((unsigned int)v) << 16); }
inline bf16_t f2bf(float f) {
    unsigned int u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}
inline float bf_lo(unsigned int w) { return as_float(w << 16); }
inline float bf_hi(unsigned int w) { return as_float(w & 0xffff0000u); }
inline unsigned int pack_bf2(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}
inline float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
inline float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
inline float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
inline float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : -INFINITY;
    return warp_max(v);
}
inline void pdl_trigger() {}
inline void pdl_wait() {}
inline void pdl_enter() {}
inline void cp_async16(void* smem, const void* gmem, int src_bytes) {
    std::memset(smem, 0, 16);
    if (src_bytes) std::memcpy(smem, gmem, 16);
}
inline void cp_async_commit() {}
template <int N>
inline void cp_async_wait() {}
// The fragment layout of kernels/common.cuh (g = lane/4, c = lane%4):
//   a0 = A[g][2c..2c+1], a1 = A[g+8][2c..], a2 = A[g][2c+8..], a3 = A[g+8][2c+8..]
//   b0 = B[2c..2c+1][g],  b1 = B[2c+8..][g];  d0,d1 = D[g][2c..], d2,d3 = D[g+8][2c..]
inline void mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b) {
    static unsigned int fa[1024][4], fb[1024][2];
    const int t = (int)threadIdx.x, lane = t & 31, w0 = t & ~31;
    for (int e = 0; e < 4; ++e) fa[t][e] = a[e];
    for (int e = 0; e < 2; ++e) fb[t][e] = b[e];
    warp_sync();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, c = l & 3;
        const unsigned int* x = fa[w0 + l];
        const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
        for (int e = 0; e < 4; ++e) {
            A[rows[e]][cols[e]] = bf_lo(x[e]);
            A[rows[e]][cols[e] + 1] = bf_hi(x[e]);
        }
        const unsigned int* y = fb[w0 + l];
        B[2 * c][g] = bf_lo(y[0]);
        B[2 * c + 1][g] = bf_hi(y[0]);
        B[2 * c + 8][g] = bf_lo(y[1]);
        B[2 * c + 9][g] = bf_hi(y[1]);
    }
    warp_sync();
    const int g = lane >> 2, c = lane & 3;
    for (int e = 0; e < 4; ++e) {
        const int r = g + (e >> 1) * 8, col = 2 * c + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; ++k) s = fmaf(A[r][k], B[k][col], s);
        d[e] = s;
    }
}
