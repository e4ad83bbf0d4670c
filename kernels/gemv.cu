// gemv.cu: skinny matrix product for decode batches of 1–64 rows (memory-bound).
//
//   out[b, m] = Σ_k f32(x[b, k]) · f32(W[m, k])      x bf16 [B, K], W bf16 [M, K], out f32 [B, M]
//
// Every weight element is read once from DRAM (16-byte streaming loads that skip L1) and used for
// all B rows. The products run on tensor cores (mma m16n8k16, bf16 inputs, f32 accumulate): a
// bf16·bf16 product is exact in f32, so only the summation order differs from a scalar loop — and
// tensor cores do not pay per batch row the way scalar FMAs plus bf16→f32 conversions of x did, so
// batch 8 or 16 costs about what batch 1 costs. No rounding on output (f32).
//
// Tile: one block owns 16 weight rows (the mma's 16 "M" rows) and all B ≤ 8·NT batch rows (the
// mma's 8 "N" columns, twice for the 16 bucket; columns ≥ B are fed zeros and never stored).
// Split-K inside the block: warp w takes k-steps of 32 elements s = 64·i + 4·w + u (u < 4), so
// each lane has 8 weight loads of 16 bytes in flight (4 steps × rows g and g+8). Lane (g = lane/4,
// c = lane%4) loads the 16-byte chunk q = 4·s + c of weight rows m0+g and m0+g+8 and of x row g;
// the k order inside an mma is free as long as A and B agree, so chunk words (0,1) feed k-slots
// 2c,2c+1 and words (2,3) k-slots 2c+8,2c+9 of one mma, words (4..7) of a second. Chunks past K
// (K % 8 == 0 but K % 32 may not be 0) and rows past M load zeros. The 16 warps' partial tiles are
// summed in shared memory (fixed order, deterministic) and written without atomics.
// x (B·K·2 bytes: 460 KB at B=16, K=14336) is read through L1/L2 with __ldg: one 16-byte load per lane per
// weight-row pair (not one per batch row, as before), shared by every block on the SM.
// K % 8 == 0 (checked on the host); pointers 16-byte aligned.
// Exported per batch bucket: gemv_bf16_b{2,4,8} (one 8-column tile), gemv_bf16_b16 (two),
// gemv_bf16_b32 (four) and gemv_bf16_b64 (eight; 8 warps per block); each handles B ≤ its
// bucket. live (nullable, device) and row0: the launch covers rows row0.. of a larger batch of
// which only rows < *live are needed, so it computes min(B, *live − row0) rows (none: it returns
// before loading weights). Launch: grid (ceil(M / 16)), block 512 (16 warps; 256 for b64),
// static shared memory 8, 16 or 32 KB. gemv_bf16_b16_w8 / _b32_w8 (and
// their glu twins): the same with 8 warps per block (block 256, half the shared memory), so that
// more than one block fits on an SM at their register counts (THINKSTEER_GEMV_WARPS=8, until
// timed).
//
// gemv_bf16_b1 (a single row) stays a scalar kernel: WPR warps per output feature (1, 2, 4 or 8:
// gemv_bf16_b1, _b1_k2, _b1_k4, _b1_k8, chosen on the host from K), warp p of a row summing the 16-byte
// chunks c ≡ lane + 32·p (mod 32·WPR) with 8 loads in flight, a warp reduction, and the WPR
// partial sums added in a fixed order.
// Measured on the H100 it streamed the 8B shape's large matrices faster than the tensor-core
// tile at one row (7.03 vs 8.37 ms/token for the whole model, PERFORMANCE.md runs 1–2).
// Launch: grid (ceil(M / (8 / WPR))), block 256.
//
// (Single-row variants that computed the RMSNorm inside every block and fused the residual add
// were measured slower than these plus residual_norm on the H100 (PERFORMANCE.md run 13): each
// block re-read and reduced the residual, which cost more than the launch PDL already hides.)
//
// gemv_glu_bf16_* (the MLP's gate|up product with SiLU·mul fused): W bf16 [2F, K] holds the gate
// rows then the up rows, and act[b, f] = bf16(silu(x_b·W[f]) · (x_b·W[F + f])) bf16 [B, F] is
// written directly (M = F in the arguments); the same arithmetic as gemv then silu_mul_bf16, so
// the output is identical to that pair (f32 sums rounded once). Single row: each warp reads both
// rows of its feature; tensor-core buckets: a block owns 8 features (16 mma rows), grid ceil(F / 8).
#include "common.cuh"

#define GEMV_WARPS 16  // warps per block of the tensor-core buckets (the _w8 variants: 8)
#define GEMV_THREADS (GEMV_WARPS * 32)
#define GEMV_ROWS 16
#define GEMV_UNROLL 4
// Loads in flight per lane in the single-row kernel: all 6 of a K = 1536 row at once.
#define GEMV1_UNROLL 8

// Σ of the 8 products of two 16-byte bf16 chunks, in f32.
__device__ __forceinline__ float dot8(uint4 w, uint4 x) {
    return bf_lo(w.x) * bf_lo(x.x) + bf_hi(w.x) * bf_hi(x.x) + bf_lo(w.y) * bf_lo(x.y) + bf_hi(w.y) * bf_hi(x.y) +
           bf_lo(w.z) * bf_lo(x.z) + bf_hi(w.z) * bf_hi(x.z) + bf_lo(w.w) * bf_lo(x.w) + bf_hi(w.w) * bf_hi(x.w);
}

// PDL (common.cuh): every kernel here issues its first round of weight loads, then waits for the
// previous kernel, then reads x.
//
// Weights are touched once: they are read with ld_stream (common.cuh), which bypasses L1 so x
// keeps it.

// NT: 8-column batch tiles (1 for B ≤ 8, 2 for B ≤ 16, 4 for B ≤ 32, 8 for B ≤ 64). GLU: the block's 16 mma
// rows are gate rows m0..m0+7 (W rows m0 + g) and the matching up rows (W rows M + m0 + g), and
// the epilogue writes act = bf16(silu(gate)·up) [B, M] instead of out.
// WARPS: warps per block (16, or 8 for the _w8 variants).
template <int NT, bool GLU, int WARPS>
__device__ __forceinline__ void gemv_body(float* __restrict__ out, bf16_t* __restrict__ act,
                                          const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int B,
                                          int M, int K, const int* __restrict__ live, int row0) {
    constexpr int THREADS = WARPS * 32;
    // Partial D tiles per warp: [warp][tile·4 + fragment register][lane].
    __shared__ float red[WARPS][NT * 4][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, c = lane & 3;
    const int m0 = blockIdx.x * (GLU ? GEMV_ROWS / 2 : GEMV_ROWS);
    const int nchunk = K >> 3;            // 16-byte chunks per row
    const int nstep = (nchunk + 3) >> 2;  // 32-element k-steps (last one may be partial)

    const bool lo_ok = m0 + g < M, hi_ok = GLU ? lo_ok : m0 + g + 8 < M;
    const int hi_row = GLU ? M + m0 + g : m0 + g + 8;
    const uint4* w_lo = reinterpret_cast<const uint4*>(W + (size_t)(lo_ok ? m0 + g : 0) * K);
    const uint4* w_hi = reinterpret_cast<const uint4*>(W + (size_t)(hi_ok ? hi_row : 0) * K);
    const uint4 zero = make_uint4(0, 0, 0, 0);

    float d[NT][4];
#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) d[t][r] = 0.0f;

    // The first round of weight loads is issued before waiting for the previous kernel (PDL):
    // weights are never written, so they stream while that kernel finishes.
    uint4 wl[GEMV_UNROLL], wh[GEMV_UNROLL];
    auto load_round = [&](int s0) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int q = 4 * (s0 + u) + c;
            const bool ok = q < nchunk;
            wl[u] = ok && lo_ok ? ld_stream(w_lo + q) : zero;
            wh[u] = ok && hi_ok ? ld_stream(w_hi + q) : zero;
        }
    };
    // With a live count the rows are known only after the wait; a launch whose rows are all past
    // it returns without touching the weights.
    pdl_trigger();
    if (live == nullptr) load_round(warp * GEMV_UNROLL);
    pdl_wait();
    if (live != nullptr) {
        B = min(B, *live - row0);
        if (B <= 0) return;
        load_round(warp * GEMV_UNROLL);
    }
    const uint4* xr[NT];
    bool x_ok[NT];
#pragma unroll
    for (int t = 0; t < NT; ++t) {
        x_ok[t] = t * 8 + g < B;
        xr[t] = reinterpret_cast<const uint4*>(x + (size_t)(x_ok[t] ? t * 8 + g : 0) * K);
    }
    for (int s0 = warp * GEMV_UNROLL; s0 < nstep; s0 += WARPS * GEMV_UNROLL) {
        if (s0 != warp * GEMV_UNROLL) load_round(s0);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int q = 4 * (s0 + u) + c;
            const bool ok = q < nchunk;
            const unsigned int a0[4] = {wl[u].x, wh[u].x, wl[u].y, wh[u].y};
            const unsigned int a1[4] = {wl[u].z, wh[u].z, wl[u].w, wh[u].w};
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const uint4 xv = ok && x_ok[t] ? __ldg(xr[t] + q) : zero;
                const unsigned int b0[2] = {xv.x, xv.y};
                const unsigned int b1[2] = {xv.z, xv.w};
                mma_bf16_16816(d[t], a0, b0);
                mma_bf16_16816(d[t], a1, b1);
            }
        }
    }

#pragma unroll
    for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[warp][t * 4 + r][lane] = d[t][r];
    __syncthreads();
    if (GLU) {
        // Registers r and r + 2 of lane (g, c) are the gate and up rows of feature m0 + g.
        for (int i = threadIdx.x; i < NT * 2 * 32; i += THREADS) {
            const int j = i >> 5, l = i & 31;
            const int t = j >> 1, r = j & 1;
            float gs = 0.0f, us = 0.0f;
#pragma unroll
            for (int w = 0; w < WARPS; ++w) {
                gs += red[w][t * 4 + r][l];
                us += red[w][t * 4 + r + 2][l];
            }
            const int b = t * 8 + 2 * (l & 3) + r;
            const int m = m0 + (l >> 2);
            if (b < B && m < M) act[(size_t)b * M + m] = f2bf(silu_mul(gs, us));
        }
        return;
    }
    // D fragment: register r of lane (g, c) is row g + 8·(r/2), column 2c + r%2.
    for (int i = threadIdx.x; i < NT * 4 * 32; i += THREADS) {
        const int j = i >> 5, l = i & 31;
        float v = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) v += red[w][j][l];
        const int t = j >> 2, r = j & 3;
        const int b = t * 8 + 2 * (l & 3) + (r & 1);
        const int m = m0 + (l >> 2) + 8 * (r >> 1);
        if (b < B && m < M) out[(size_t)b * M + m] = v;
    }
}

#define GEMV_KERNEL(NAME, GLU_NAME, NT, WARPS, BOUNDS)                                                      \
    extern "C" __global__ void __launch_bounds__ BOUNDS NAME(                                            \
        float* __restrict__ out, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int B, int M,   \
        int K, const int* __restrict__ live, int row0) {                                                    \
        gemv_body<NT, false, WARPS>(out, nullptr, x, W, B, M, K, live, row0);                               \
    }                                                                                                       \
    extern "C" __global__ void __launch_bounds__ BOUNDS GLU_NAME(                                        \
        bf16_t* __restrict__ act, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int B, int M, \
        int K, const int* __restrict__ live, int row0) {                                                    \
        gemv_body<NT, true, WARPS>(nullptr, act, x, W, B, M, K, live, row0);                                \
    }
GEMV_KERNEL(gemv_bf16_b2, gemv_glu_bf16_b2, 1, GEMV_WARPS, (GEMV_THREADS))
GEMV_KERNEL(gemv_bf16_b4, gemv_glu_bf16_b4, 1, GEMV_WARPS, (GEMV_THREADS))
GEMV_KERNEL(gemv_bf16_b8, gemv_glu_bf16_b8, 1, GEMV_WARPS, (GEMV_THREADS))
GEMV_KERNEL(gemv_bf16_b16, gemv_glu_bf16_b16, 2, GEMV_WARPS, (GEMV_THREADS))
GEMV_KERNEL(gemv_bf16_b32, gemv_glu_bf16_b32, 4, GEMV_WARPS, (GEMV_THREADS))
// 8 warps per block: at 82–128 registers per thread a 512-thread block of the 16 / 32 buckets
// is alone on its SM (16 warps, one round of loads in flight, then its reduction). 256-thread
// blocks bounded to 80 registers (16 bucket, no spills) fit 3 per SM (24 warps); the 32 bucket
// spills at 80, so it keeps its registers and fits 2 (16 warps in two blocks, one block's loads
// overlapping the other's reduction).
GEMV_KERNEL(gemv_bf16_b16_w8, gemv_glu_bf16_b16_w8, 2, 8, (256, 3))
GEMV_KERNEL(gemv_bf16_b32_w8, gemv_glu_bf16_b32_w8, 4, 8, (256, 2))
// 64 rows (THINKSTEER_GEMV_ROWS=64, until timed): each weight element read once for all 64
// instead of once per 32-row group; 8 warps bounded to 128 registers (no spills), 2 per SM.
GEMV_KERNEL(gemv_bf16_b64, gemv_glu_bf16_b64, 8, 8, (256, 2))

// The single-row kernels described in the banner: WPR warps share one output row (split-K), so
// long rows (K = 8960, 14336) take fewer serial load rounds and more blocks fill the GPU.
// GLU: act = bf16(silu(gate)·up) from rows m and M + m.
template <int WPR, bool GLU>
__device__ __forceinline__ void gemv1_body(void* __restrict__ out_, const bf16_t* __restrict__ x,
                                           const bf16_t* __restrict__ W, int B, int M, int K) {
    __shared__ float red[2][8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int part = warp % WPR;
    const int m = blockIdx.x * (8 / WPR) + warp / WPR;
    const bool ok_row = m < M && B >= 1;
    const int nchunk = K / 8;
    const uint4* wrow = reinterpret_cast<const uint4*>(W + (size_t)(ok_row ? m : 0) * K);
    // GLU: the matching up row M + m as well.
    const uint4* urow = reinterpret_cast<const uint4*>(W + (size_t)(ok_row && GLU ? M + m : 0) * K);
    const uint4* x8 = reinterpret_cast<const uint4*>(x);
    float acc = 0.0f, acc_u = 0.0f;
    // As in gemv_body: the first round of weight loads goes out before the PDL wait.
    uint4 wv[GEMV1_UNROLL], uv[GEMV1_UNROLL];
    auto load_round = [&](int c0) {
#pragma unroll
        for (int u = 0; u < GEMV1_UNROLL; ++u) {
            const int c = c0 + 32 * WPR * u;
            const bool ok = ok_row && c < nchunk;
            wv[u] = ok ? ld_stream(wrow + c) : make_uint4(0, 0, 0, 0);
            if (GLU) uv[u] = ok ? ld_stream(urow + c) : make_uint4(0, 0, 0, 0);
        }
    };
    const int first = lane + 32 * part;
    pdl_trigger();
    load_round(first);
    pdl_wait();
    for (int c0 = first; ok_row && c0 < nchunk; c0 += 32 * WPR * GEMV1_UNROLL) {
        if (c0 != first) load_round(c0);
#pragma unroll
        for (int u = 0; u < GEMV1_UNROLL; ++u) {
            const int c = c0 + 32 * WPR * u;
            if (c < nchunk) {
                const uint4 xv = __ldg(x8 + c);
                acc += dot8(wv[u], xv);
                if (GLU) acc_u += dot8(uv[u], xv);
            }
        }
    }
    const float v = warp_sum(acc);
    const float vu = GLU ? warp_sum(acc_u) : 0.0f;
    float tot = v, tot_u = vu;
    if (WPR > 1) {
        if (lane == 0) {
            red[0][warp] = v;
            red[1][warp] = vu;
        }
        __syncthreads();
        tot = 0.0f;
        tot_u = 0.0f;
#pragma unroll
        for (int p = 0; p < WPR; ++p) {  // fixed order: deterministic
            tot += red[0][warp - part + p];
            tot_u += red[1][warp - part + p];
        }
    }
    if (ok_row && part == 0 && lane == 0) {
        if (GLU)
            static_cast<bf16_t*>(out_)[m] = f2bf(silu_mul(tot, tot_u));
        else
            static_cast<float*>(out_)[m] = tot;
    }
}

// Every single-row kernel takes (out, x, W, B, M, K).
#define GEMV1_KERNEL(NAME, WPR, GLU)                                                                  \
    extern "C" __global__ void NAME(void* __restrict__ out, const bf16_t* __restrict__ x,             \
                                    const bf16_t* __restrict__ W, int B, int M, int K) {              \
        gemv1_body<WPR, GLU>(out, x, W, B, M, K);                                                     \
    }
#define GEMV1_KERNELS(SUFFIX, WPR)                            \
    GEMV1_KERNEL(gemv_bf16_b1##SUFFIX, WPR, false)            \
    GEMV1_KERNEL(gemv_glu_bf16_b1##SUFFIX, WPR, true)
GEMV1_KERNELS(, 1)
GEMV1_KERNELS(_k2, 2)
GEMV1_KERNELS(_k4, 4)
GEMV1_KERNELS(_k8, 8)
