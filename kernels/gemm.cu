// gemm.cu: tensor-core matrix product for prefill and large batches.
//
//   out[n, m] = Σ_k f32(x[n, k]) · f32(W[m, k])     x bf16 [N, K], W bf16 [M, K], out f32 [N, M]
//
// mma.sync m16n8k16 (bf16 in, f32 accumulate); the order of the K sum is the tensor core's.
// No rounding on output (f32). Any N and M (edge tiles are zero-filled by cp.async and the
// epilogue masks stores); K % 8 == 0 and 16-byte-aligned x and W (checked on the host).
// Tiles: block BN (n) × 128 (m) × 32 (k), double-buffered through shared memory with cp.async;
// WN × 2 warps, each 32 × 64 = 2 × 8 mma tiles. Exported: gemm_bf16 (BN = 64, 4 warps) and
// gemm_bf16_n128 (BN = 128, 8 warps: each W tile serves twice the rows, twice the warps per
// block; for N well above 128).
// live (nullable, device): only rows n < min(N, *live) are needed; row tiles past them return at
// once (the hybrid step's candidate rows, whose count is decided on the device).
// Split K (decode batches, whose few output tiles would leave most SMs idle): blockIdx.z takes
// the k tiles [z·per, (z+1)·per). With gridDim.z == 1 the block writes out; otherwise its raw
// sums go to part[z][n][m] (f32 [splits, N, M]) and vg_mm_reduce_f32 (grad.cu) adds them in z
// order (deterministic).
// Launch: grid (ceil(M / 128), ceil(N / BN), splits), block 32·2·WN, 30 KB (BN 64) or 40 KB
// static shared memory.
#include "common.cuh"

#define GM_BM 128  // W rows per block
#define GM_BK 32
#define GM_LD 40  // padded row (80 bytes): fragment loads of 8 rows hit 8 different bank groups

template <int WN>  // warps along n; BN = 32·WN x rows per block
__device__ __forceinline__ void gemm_body(float* __restrict__ out, const bf16_t* __restrict__ x,
                                          const bf16_t* __restrict__ W, int N, int M, int K, int kt0,
                                          int kt1) {
    constexpr int BN = 32 * WN, THREADS = 64 * WN;
    __shared__ __align__(16) bf16_t As[2][BN][GM_LD];
    __shared__ __align__(16) bf16_t Bs[2][GM_BM][GM_LD];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp >> 1, wm = warp & 1;  // warp's 32-row slice of x, 64-row slice of W
    const int g = lane >> 2, c = lane & 3;
    const int m0 = blockIdx.x * GM_BM, n0 = blockIdx.y * BN;
    if (n0 >= N) return;  // a row tile past the live rows

    auto load_tile = [&](int kt, int buf) {
        const int k0 = kt * GM_BK;
#pragma unroll
        for (int i = 0; i < BN * 4 / THREADS; ++i) {  // A: BN rows × 4 chunks of 8
            const int ch = tid + i * THREADS, row = ch >> 2, kc = (ch & 3) * 8;
            const bool ok = n0 + row < N && k0 + kc < K;
            const bf16_t* src = ok ? x + (size_t)(n0 + row) * K + k0 + kc : x;
            cp_async16(&As[buf][row][kc], src, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < GM_BM * 4 / THREADS; ++i) {  // B: 128 rows × 4 chunks of 8
            const int ch = tid + i * THREADS, row = ch >> 2, kc = (ch & 3) * 8;
            const bool ok = m0 + row < M && k0 + kc < K;
            const bf16_t* src = ok ? W + (size_t)(m0 + row) * K + k0 + kc : W;
            cp_async16(&Bs[buf][row][kc], src, ok ? 16 : 0);
        }
        cp_async_commit();
    };
    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // k tiles [kt0, kt1): all of K, or this block's split.
    load_tile(kt0, 0);
    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        if (kt + 1 < kt1) {
            load_tile(kt + 1, buf ^ 1);
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < GM_BK; kk += 16) {
            unsigned int a[2][4], b[8][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) frag_a(a[i], &As[buf][0][0], GM_LD, wn * 32 + i * 16, kk, g, c);
#pragma unroll
            for (int j = 0; j < 8; ++j) frag_b(b[j], &Bs[buf][0][0], GM_LD, wm * 64 + j * 8, kk, g, c);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) mma_bf16_16816(acc[i][j], a[i], b[j]);
        }
        __syncthreads();  // this buffer is refilled by the next iteration's load
    }

#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int r = n0 + wn * 32 + i * 16 + g;
            const int col = m0 + wm * 64 + j * 8 + 2 * c;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = r + (e >> 1) * 8, cc = col + (e & 1);
                if (rr < N && cc < M) out[(size_t)rr * M + cc] = acc[i][j][e];
            }
        }
    }
}

// The block's k tiles and output: all of K into out, or split z of `per` tiles into part.
struct GemmSplit {
    float* dst;
    int kt0, kt1;
};
__device__ __forceinline__ GemmSplit gemm_split(float* out, float* part, int N, int M, int K, int per) {
    const int nk = (K + GM_BK - 1) / GM_BK;
    if (gridDim.z == 1) return {out, 0, nk};
    const int kt0 = blockIdx.z * per;
    return {part + (size_t)blockIdx.z * N * M, kt0, min(nk, kt0 + per)};
}

extern "C" __global__ void __launch_bounds__(128) gemm_bf16(float* __restrict__ out, const bf16_t* __restrict__ x,
                                                           const bf16_t* __restrict__ W, int N, int M, int K,
                                                           const int* __restrict__ live, float* __restrict__ part,
                                                           int per) {
    pdl_enter();
    const GemmSplit sp = gemm_split(out, part, N, M, K, per);
    gemm_body<2>(sp.dst, x, W, live_rows(live, N), M, K, sp.kt0, sp.kt1);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_bf16_n128(float* __restrict__ out, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N, int M,
                   int K, const int* __restrict__ live, float* __restrict__ part, int per) {
    pdl_enter();
    const GemmSplit sp = gemm_split(out, part, N, M, K, per);
    gemm_body<4>(sp.dst, x, W, live_rows(live, N), M, K, sp.kt0, sp.kt1);
}
