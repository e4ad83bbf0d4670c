// gemv.cu: skinny matrix product for decode batches of 1–16 rows (memory-bound).
//
//   out[b, m] = Σ_k f32(x[b, k]) · f32(W[m, k])      x bf16 [B, K], W bf16 [M, K], out f32 [B, M]
//
// Every weight element is read once (one 16-byte streaming load = 8 elements) and used for all B
// rows; x is small and stays in L1/L2. Accumulation in f32: each lane sums its 8-element chunks
// (k ≡ 8·lane mod 256), then a butterfly warp reduction. No rounding on output (f32).
// K % 8 == 0 (checked on the host); pointers 16-byte aligned.
// Exported per batch bucket: gemv_bf16_b{1,2,4,8,16} handle B ≤ the bucket (the host picks the
// smallest bucket ≥ B, so registers are sized for the real batch).
// Launch: grid (ceil(M / 8)), block 256: one warp per output feature m, 4 loads in flight per lane.
// (No __launch_bounds__: with it ptxas spilled gemv_bf16_b8 on sm_80.)
#include "common.cuh"

#define GEMV_WARPS 8
#define GEMV_UNROLL 4

// Weights are touched once: bypass L1 so x keeps it.
__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    float s = bf_lo(w.x) * bf_lo(x.x);
    s += bf_hi(w.x) * bf_hi(x.x);
    s += bf_lo(w.y) * bf_lo(x.y);
    s += bf_hi(w.y) * bf_hi(x.y);
    s += bf_lo(w.z) * bf_lo(x.z);
    s += bf_hi(w.z) * bf_hi(x.z);
    s += bf_lo(w.w) * bf_lo(x.w);
    s += bf_hi(w.w) * bf_hi(x.w);
    return s;
}

template <int BMAX>
__device__ __forceinline__ void gemv_body(float* __restrict__ out, const bf16_t* __restrict__ x,
                                          const bf16_t* __restrict__ W, int B, int M, int K) {
    const int lane = threadIdx.x & 31;
    const int m = blockIdx.x * GEMV_WARPS + (threadIdx.x >> 5);
    if (m >= M) return;
    const int nchunk = K / 8;
    const uint4* wrow = reinterpret_cast<const uint4*>(W + (size_t)m * K);
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    float acc[BMAX];
#pragma unroll
    for (int b = 0; b < BMAX; ++b) acc[b] = 0.0f;
    for (int c0 = lane; c0 < nchunk; c0 += 32 * GEMV_UNROLL) {
        uint4 wv[GEMV_UNROLL];
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = c0 + 32 * u;
            wv[u] = c < nchunk ? ld_stream(wrow + c) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = c0 + 32 * u;
            if (c < nchunk) {
#pragma unroll
                for (int b = 0; b < BMAX; ++b)
                    if (b < B) acc[b] += dot8(wv[u], __ldg(x8 + (size_t)b * nchunk + c));
            }
        }
    }
#pragma unroll
    for (int b = 0; b < BMAX; ++b) {
        if (b < B) {
            const float v = warp_sum(acc[b]);
            if (lane == 0) out[(size_t)b * M + m] = v;
        }
    }
}

#define GEMV_KERNEL(BM)                                                                                   \
    extern "C" __global__ void gemv_bf16_b##BM(                                    \
        float* __restrict__ out, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int B, int M, \
        int K) {                                                                                          \
        gemv_body<BM>(out, x, W, B, M, K);                                                                \
    }
GEMV_KERNEL(1)
GEMV_KERNEL(2)
GEMV_KERNEL(4)
GEMV_KERNEL(8)
GEMV_KERNEL(16)
