// gemm.cu: tensor-core matrix product for prefill and large batches.
//
//   out[n, m] = Σ_k f32(x[n, k]) · f32(W[m, k])     x bf16 [N, K], W bf16 [M, K], out f32 [N, M]
//
// mma.sync m16n8k16 (bf16 in, f32 accumulate); the order of the K sum is the tensor core's.
// No rounding on output (f32). Any N and M (edge tiles are zero-filled by cp.async and the
// epilogue masks stores); K % 8 == 0 and 16-byte-aligned x and W (checked on the host).
// Tiles: block BN (n) × 128 (m) × 32 (k) through a ring of STAGES shared-memory buffers filled
// by cp.async (STAGES − 1 tiles in flight while one is multiplied; one barrier per k tile);
// WN × 2 warps, each 32 × 64 = 2 × 8 mma tiles, fragments loaded by ldmatrix (per 16-wide k
// step: 2 for A, 4 for B, instead of 24 32-bit loads). Exported: gemm_bf16 (BN = 64, 4 warps,
// 3 stages) and gemm_bf16_n128 (BN = 128, 8 warps, 2 stages: each W tile serves twice the rows,
// twice the warps per block; for N well above 128).
// gemm_glu_bf16 / gemm_glu_bf16_n128 (the gate|up product of the MLP, SiLU·mul in the epilogue):
//   act[n, f] = bf16(silu(g) · u),  g = Σ_k x[n, k]·W[f, k],  u = Σ_k x[n, k]·W[F + f, k]
// with W the fused [gate; up] weights bf16 [2F, K] and act bf16 [N, F]; the gate and up sums are
// those of gemm_bf16 (same k order) and silu_mul as silu_mul_bf16, so act equals gemm then
// silu_mul bit for bit, without the f32 [N, 2F] round trip. A block's 128 W rows are gate rows
// f0..f0+63 (the wm = 0 warps) and up rows F+f0.. (wm = 1), f0 = 64·(the block's column tile);
// the up sums pass to the gate warps through the ring's shared memory after the last k tile. No
// split K.
// live (nullable, device): only rows n < min(N, *live) are needed; row tiles past them return at
// once (the hybrid step's candidate rows, whose count is decided on the device).
// Split K (decode batches, whose few output tiles would leave most SMs idle): blockIdx.z takes
// the k tiles [z·per, (z+1)·per). With gridDim.z == 1 the block writes out; otherwise its raw
// sums go to part[z][n][m] (f32 [splits, N, M]) and vg_mm_reduce_f32 (grad.cu) adds them in z
// order (deterministic).
// Launch: grid (ceil(M / 128), ceil(N / BN), splits) — glu: (ceil(F / 64), ceil(N / BN), 1) —,
// block 32·2·WN, 45 KB (BN 64) or 40 KB (BN 128) static shared memory. Blocks take their (column,
// row) tiles in common.cuh's grouped order (gemm_tile), for L2 reuse of W.
#include "common.cuh"

#define GM_BM 128  // W rows per block
#define GM_BK 32
#define GM_LD 40  // padded row (80 bytes): an ldmatrix phase's 8 rows hit 8 different 16-byte bank groups
#define GM_UP_LD 68  // row of the glu epilogue's up sums (64 floats + 4: rows g and g + 1 on other banks)

// GLU: out is unused and act written (M = F); else out written (M rows of W).
template <int WN, int STAGES, bool GLU>  // warps along n (BN = 32·WN x rows per block); ring buffers
__device__ __forceinline__ void gemm_body(float* __restrict__ out, bf16_t* __restrict__ act,
                                          const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N,
                                          int M, int K, int kt0, int kt1) {
    constexpr int BN = 32 * WN, THREADS = 64 * WN;
    constexpr int RING = STAGES * (BN + GM_BM) * GM_LD * 2;  // bytes
    static_assert(!GLU || BN * GM_UP_LD * 4 <= RING, "the up sums fit in the ring");
    __shared__ __align__(16) unsigned char smem[RING];
    bf16_t(*As)[BN][GM_LD] = reinterpret_cast<bf16_t(*)[BN][GM_LD]>(smem);
    bf16_t(*Bs)[GM_BM][GM_LD] = reinterpret_cast<bf16_t(*)[GM_BM][GM_LD]>(smem + STAGES * BN * GM_LD * 2);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp >> 1, wm = warp & 1;  // warp's 32-row slice of x, 64-row slice of W
    const int g = lane >> 2, c = lane & 3;
    int mt, nt;
    gemm_tile(&mt, &nt);
    const int m0 = mt * (GLU ? GM_BM / 2 : GM_BM), n0 = nt * BN;
    if (n0 >= N) return;  // a row tile past the live rows

    // Tile kt into buffer buf, as one commit group; past the block's k range an empty group, so
    // that group i always holds tile kt0 + i.
    auto load_tile = [&](int kt, int buf) {
        const int k0 = kt * GM_BK;
        if (kt < kt1) {
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
                // glu: tile rows 0..63 are gate rows m0.., 64..127 up rows M + m0..
                const int m = GLU ? m0 + (row & 63) : m0 + row, wrow = GLU ? m + (row >> 6) * M : m;
                const bool ok = m < M && k0 + kc < K;
                const bf16_t* src = ok ? W + (size_t)wrow * K + k0 + kc : W;
                cp_async16(&Bs[buf][row][kc], src, ok ? 16 : 0);
            }
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

    // ldmatrix row addresses: lane l serves row l % 8 of matrix l / 8. A fragment (16 × 16 at
    // row r): matrices rows +0 / +8 (bit 0 of l / 8) × k +0 / +8 (bit 1). Two B fragments (n
    // rows j·8 and j·8 + 8, 16 k each): matrices k +0 / +8 (bit 0) × rows +0 / +8 (bit 1).
    const int a_row = wn * 32 + (lane & 7) + ((lane >> 3) & 1) * 8, a_k = (lane >> 4) * 8;
    const int b_row = wm * 64 + (lane & 7) + (lane >> 4) * 8, b_k = ((lane >> 3) & 1) * 8;

    // k tiles [kt0, kt1): all of K, or this block's split. Tile kt0 + i sits in buffer i % STAGES.
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) load_tile(kt0 + s, s);
    for (int kt = kt0; kt < kt1; ++kt) {
        const int i = kt - kt0, buf = i % STAGES;
        cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed
        __syncthreads();  // everyone's have, and everyone is done with tile kt − 1's buffer...
        load_tile(kt + STAGES - 1, (i + STAGES - 1) % STAGES);  // ...which this refills
#pragma unroll
        for (int kk = 0; kk < GM_BK; kk += 16) {
            unsigned int a[2][4], b[8][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) ldmatrix_x4(a[i], &As[buf][a_row + i * 16][kk + a_k]);
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                unsigned int r[4];
                ldmatrix_x4(r, &Bs[buf][b_row + j * 8][kk + b_k]);
                b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) mma_bf16_16816(acc[i][j], a[i], b[j]);
        }
    }

    if (GLU) {
        // The ring's last groups were empty and every warp is past its last read of it: the up
        // warps leave their sums there, the gate warps combine them with theirs.
        __syncthreads();
        float* up = reinterpret_cast<float*>(smem);  // [BN][GM_UP_LD]
        if (wm == 1) {
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        up[(wn * 32 + i * 16 + g + (e >> 1) * 8) * GM_UP_LD + j * 8 + 2 * c + (e & 1)] = acc[i][j][e];
        }
        __syncthreads();
        if (wm == 1) return;
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int rl = wn * 32 + i * 16 + g + (e >> 1) * 8, cl = j * 8 + 2 * c + (e & 1);
                    if (n0 + rl < N && m0 + cl < M)
                        act[(size_t)(n0 + rl) * M + m0 + cl] = f2bf(silu_mul(acc[i][j][e], up[rl * GM_UP_LD + cl]));
                }
        return;
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

extern "C" __global__ void __launch_bounds__(128) gemm_bf16(float* __restrict__ out, const bf16_t* __restrict__ x,
                                                           const bf16_t* __restrict__ W, int N, int M, int K,
                                                           const int* __restrict__ live, float* __restrict__ part,
                                                           int per) {
    pdl_enter();
    const GemmSplit sp = gemm_split(out, part, N, M, K, per, GM_BK);
    gemm_body<2, 3, false>(sp.dst, nullptr, x, W, live_rows(live, N), M, K, sp.kt0, sp.kt1);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_bf16_n128(float* __restrict__ out, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N, int M,
                   int K, const int* __restrict__ live, float* __restrict__ part, int per) {
    pdl_enter();
    const GemmSplit sp = gemm_split(out, part, N, M, K, per, GM_BK);
    gemm_body<4, 2, false>(sp.dst, nullptr, x, W, live_rows(live, N), M, K, sp.kt0, sp.kt1);
}

extern "C" __global__ void __launch_bounds__(128)
    gemm_glu_bf16(bf16_t* __restrict__ act, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N, int F,
                  int K, const int* __restrict__ live) {
    pdl_enter();
    gemm_body<2, 3, true>(nullptr, act, x, W, live_rows(live, N), F, K, 0, (K + GM_BK - 1) / GM_BK);
}

extern "C" __global__ void __launch_bounds__(256)
    gemm_glu_bf16_n128(bf16_t* __restrict__ act, const bf16_t* __restrict__ x, const bf16_t* __restrict__ W, int N,
                       int F, int K, const int* __restrict__ live) {
    pdl_enter();
    gemm_body<4, 2, true>(nullptr, act, x, W, live_rows(live, N), F, K, 0, (K + GM_BK - 1) / GM_BK);
}
