// grad.cu: the kernels of the steering-vector gradient (src/cuda/vector_grad.rs): the forward of
// blocks L+1..N−1 and the LM head over the active rows, keeping f32 activations, and the
// input-only backward of each op (formulas as in src/vector_grad/ops.rs and attention.rs).
//
// Dtypes: weights bf16, every activation and gradient stored in f32, f32 accumulation. The
// products run either on f32 FMAs (vg_mm_f32: weights widened exactly, no rounding to bf16) or
// on tensor cores (vg_mm_tc_f32: each f32 operand split into two bf16 terms, off by ≤ 2^-16 of
// itself); everything else is f32. Launch shapes are written above each kernel; all
// kernels start with pdl_enter() (they read activations from their first instruction).
#include "common.cuh"

#define VG_T 64  // rows of x per block
#define VG_N 64  // output columns per block
#define VG_K 16  // reduction step

// The 64 × 64-output tile products below (vg_mm_f32 and the attention products): 256 threads
// as 16 × 16, thread (tx, ty) owning outputs (ty + 16p, tx + 16q), p, q < 4.
__device__ __forceinline__ void tile_zero(float (&acc)[4][4]) {
#pragma unroll
    for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] = 0.0f;
}
// acc[p][q] += Σ_kk A[kk][ty + 16p]·B[kk][tx + 16q] over one 16-step held in shared memory, in
// kk order.
__device__ __forceinline__ void tile_fma(float (&acc)[4][4], const float (*A)[VG_T + 1], const float (*B)[VG_N + 1],
                                         int tx, int ty) {
#pragma unroll
    for (int kk = 0; kk < VG_K; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            a[i] = A[kk][ty + 16 * i];
            b[i] = B[kk][tx + 16 * i];
        }
#pragma unroll
        for (int p = 0; p < 4; ++p)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[p][q] = fmaf(a[p], b[q], acc[p][q]);
    }
}

// out[t, n] (+)= Σ_k x[t, k]·B[k, n] (+ bias[n]); x f32 row stride ldx, out f32 row stride ldo.
//   trans_w == 0: B[k, n] = W[n·ldw + k]  (x·Wᵀ, W [N, K]: the forward product)
//   trans_w == 1: B[k, n] = W[k·ldw + n]  (x·W,  W [K, N]: the input gradient of x·Wᵀ)
// Sum over k in order within each thread (16-wide steps). Any T, N, K.
// Launch: grid (ceil(N / 64), ceil(T / 64)), block 256 (16 × 16 threads, 4 × 4 outputs each).
extern "C" __global__ void __launch_bounds__(256)
    vg_mm_f32(float* __restrict__ out, const float* __restrict__ x, const bf16_t* __restrict__ W,
              const float* __restrict__ bias, int T, int N, int K, int ldx, int ldw, int ldo, int trans_w,
              int accumulate) {
    pdl_enter();
    __shared__ float As[VG_K][VG_T + 1];  // [k][t]
    __shared__ float Bs[VG_K][VG_N + 1];  // [k][n]
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int n0 = blockIdx.x * VG_N, t0 = blockIdx.y * VG_T;
    float acc[4][4];
    tile_zero(acc);
    for (int k0 = 0; k0 < K; k0 += VG_K) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * 256, tt = e >> 4, kk = e & 15;
            const int gt = t0 + tt, gk = k0 + kk;
            As[kk][tt] = (gt < T && gk < K) ? x[(size_t)gt * ldx + gk] : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int e = tid + i * 256;
            int kk, nn;
            if (trans_w) {
                kk = e >> 6;  // consecutive threads walk n: contiguous in W
                nn = e & 63;
            } else {
                nn = e >> 4;  // consecutive threads walk k: contiguous in W
                kk = e & 15;
            }
            const int gk = k0 + kk, gn = n0 + nn;
            float b = 0.0f;
            if (gk < K && gn < N) b = bf2f(trans_w ? W[(size_t)gk * ldw + gn] : W[(size_t)gn * ldw + gk]);
            Bs[kk][nn] = b;
        }
        __syncthreads();
        tile_fma(acc, As, Bs, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int t = t0 + ty + 16 * i;
        if (t >= T) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + tx + 16 * j;
            if (n >= N) continue;
            float v = acc[i][j] + (bias ? bias[n] : 0.0f);
            float* o = out + (size_t)t * ldo + n;
            *o = accumulate ? *o + v : v;
        }
    }
}

// The same product on tensor cores, for the large shapes of a real model:
//   out[t, n] (+)= Σ_k x[t, k]·B[k, n] (+ bias[n])   (B from W as in vg_mm_f32)
// x is f32 but mma takes bf16, so each x is split exactly into two bf16 terms, hi = bf16(x) and
// lo = bf16(x − hi) (x − hi is exact in f32), and both are multiplied by the bf16 weight:
// x·w = hi·w + lo·w + e with |e| ≤ 2^-17·|x·w| (lo keeps 8 more bits: the ~16-bit mantissa of
// hi + lo against f32's 24), products exact, sums in the tensor core's f32 accumulator. Two
// mma per tile instead of one; still ~10× the f32 FMA rate of vg_mm_f32.
// Requirements (the host falls back to vg_mm_f32 otherwise): K % 8 == 0, ldx % 4 == 0,
// ldw % 8 == 0, x and W 16-byte aligned, and N % 8 == 0 when trans_w (8-wide column chunks).
// Split K: blockIdx.z takes k tiles [z·per, (z+1)·per). With gridDim.z == 1 the block writes
// out (bias, accumulate); otherwise it writes its raw partial sums to part[z][t][n] (ld N) and
// vg_mm_reduce_f32 adds them in z order (deterministic).
// Tiles: 64 (t) × 128 (n) × 32 (k); 4 warps in a 2 × 2 grid, each 32 × 64 = 2 × 8 mma tiles.
// Global → registers for tile k+1 while tile k is multiplied from shared memory (two buffers).
// Launch: grid (ceil(N / 128), ceil(T / 64), splits), block 128, 40 KB static shared memory.
#define VT_T 64
#define VT_N 128
#define VT_K 32
#define VT_LD 40  // padded row (80 bytes), as in gemm.cu: an ldmatrix phase's rows hit distinct banks

extern "C" __global__ void __launch_bounds__(128)
    vg_mm_tc_f32(float* __restrict__ out, float* __restrict__ part, const float* __restrict__ x,
                 const bf16_t* __restrict__ W, const float* __restrict__ bias, int T, int N, int K, int ldx,
                 int ldw, int ldo, int trans_w, int accumulate, int per) {
    pdl_enter();
    __shared__ __align__(16) bf16_t Ah[2][VT_T][VT_LD];
    __shared__ __align__(16) bf16_t Al[2][VT_T][VT_LD];
    __shared__ __align__(16) bf16_t Bs[2][VT_N][VT_LD];  // [n][k]
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wt = warp >> 1, wn = warp & 1;
    const int g = lane >> 2, c = lane & 3;
    const int n0 = blockIdx.x * VT_N, t0 = blockIdx.y * VT_T;
    const int nk = (K + VT_K - 1) / VT_K;
    const int kt0 = blockIdx.z * per, kt1 = min(nk, kt0 + per);

    float4 ra[4];  // x: 64 rows × 8 chunks of 4 floats, 4 chunks per thread
    uint4 rb[4];   // W: 512 chunks of 8 bf16, 4 per thread
    auto load = [&](int kt) {
        const int k0 = kt * VT_K;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ch = tid + i * 128, row = ch >> 3, kc = (ch & 7) * 4;
            const bool ok = t0 + row < T && k0 + kc < K;
            ra[i] = ok ? *reinterpret_cast<const float4*>(x + (size_t)(t0 + row) * ldx + k0 + kc)
                       : make_float4(0.f, 0.f, 0.f, 0.f);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ch = tid + i * 128;
            bool ok;
            const bf16_t* src;
            if (trans_w) {  // W [K, N]: 32 k rows × 16 chunks of 8 n; a warp walks k (see store)
                const int kr = ch & 31, nc = (ch >> 5) * 8;
                ok = k0 + kr < K && n0 + nc < N;
                src = W + (size_t)(k0 + kr) * ldw + n0 + nc;
            } else {  // W [N, K]: 128 n rows × 4 chunks of 8 k
                const int row = ch >> 2, kc = (ch & 3) * 8;
                ok = n0 + row < N && k0 + kc < K;
                src = W + (size_t)(n0 + row) * ldw + k0 + kc;
            }
            rb[i] = ok ? *reinterpret_cast<const uint4*>(src) : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    auto store = [&](int buf) {
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ch = tid + i * 128, row = ch >> 3, kc = (ch & 7) * 4;
            const float v[4] = {ra[i].x, ra[i].y, ra[i].z, ra[i].w};
            float lo[4];
            bf16_t hb[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                hb[e] = f2bf(v[e]);
                lo[e] = v[e] - bf2f(hb[e]);
            }
            uint2 h2, l2;
            h2.x = (unsigned int)hb[0] | ((unsigned int)hb[1] << 16);
            h2.y = (unsigned int)hb[2] | ((unsigned int)hb[3] << 16);
            l2.x = pack_bf2(lo[0], lo[1]);
            l2.y = pack_bf2(lo[2], lo[3]);
            *reinterpret_cast<uint2*>(&Ah[buf][row][kc]) = h2;
            *reinterpret_cast<uint2*>(&Al[buf][row][kc]) = l2;
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int ch = tid + i * 128;
            if (trans_w) {  // transpose: 8 n values at one k; the 32 lanes write 32 adjacent k
                const int kr = ch & 31, nc = (ch >> 5) * 8;
                const unsigned int w4[4] = {rb[i].x, rb[i].y, rb[i].z, rb[i].w};
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    Bs[buf][nc + 2 * e][kr] = (bf16_t)(w4[e] & 0xffffu);
                    Bs[buf][nc + 2 * e + 1][kr] = (bf16_t)(w4[e] >> 16);
                }
            } else {
                const int row = ch >> 2, kc = (ch & 3) * 8;
                *reinterpret_cast<uint4*>(&Bs[buf][row][kc]) = rb[i];
            }
        }
    };

    float acc[2][8][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    // ldmatrix row addresses, as in gemm.cu: lane l serves row l % 8 of matrix l / 8; an A
    // fragment's matrices are rows +0 / +8 × k +0 / +8, a pair of B fragments' k +0 / +8 × n
    // rows +0 / +8.
    const int a_row = wt * 32 + (lane & 7) + ((lane >> 3) & 1) * 8, a_k = (lane >> 4) * 8;
    const int b_row = wn * 64 + (lane & 7) + (lane >> 4) * 8, b_k = ((lane >> 3) & 1) * 8;

    if (kt0 < kt1) load(kt0);
    for (int kt = kt0; kt < kt1; ++kt) {
        const int buf = (kt - kt0) & 1;
        store(buf);
        __syncthreads();  // also: every warp is done with buf^1 (read in the previous step)
        if (kt + 1 < kt1) load(kt + 1);  // in flight during the products below
#pragma unroll
        for (int kk = 0; kk < VT_K; kk += 16) {
            unsigned int ah[2][4], al[2][4], b[8][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                ldmatrix_x4(ah[i], &Ah[buf][a_row + i * 16][kk + a_k]);
                ldmatrix_x4(al[i], &Al[buf][a_row + i * 16][kk + a_k]);
            }
#pragma unroll
            for (int j = 0; j < 8; j += 2) {
                unsigned int r[4];
                ldmatrix_x4(r, &Bs[buf][b_row + j * 8][kk + b_k]);
                b[j][0] = r[0], b[j][1] = r[1], b[j + 1][0] = r[2], b[j + 1][1] = r[3];
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    mma_bf16_16816(acc[i][j], al[i], b[j]);  // the small term first
                    mma_bf16_16816(acc[i][j], ah[i], b[j]);
                }
        }
    }

    const bool split = gridDim.z > 1;
    float* dst = split ? part + (size_t)blockIdx.z * T * N : out;
    const int ld = split ? N : ldo;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int r = t0 + wt * 32 + i * 16 + g;
            const int col = n0 + wn * 64 + j * 8 + 2 * c;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int rr = r + (e >> 1) * 8, cc = col + (e & 1);
                if (rr >= T || cc >= N) continue;
                float v = acc[i][j][e];
                float* o = dst + (size_t)rr * ld + cc;
                if (!split) {
                    v += bias ? bias[cc] : 0.0f;
                    v = accumulate ? *o + v : v;
                }
                *o = v;
            }
        }
    }
}

// out[t, n] (+)= Σ_z part[z][t][n] (+ bias[n]), z in order: the end of a split vg_mm_tc_f32 (and
// of a split gemm_bf16). live (nullable, device): only rows t < *live (common.cuh live_rows).
// Launch: grid-stride over T·N, block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_mm_reduce_f32(float* __restrict__ out, const float* __restrict__ part, const float* __restrict__ bias,
                     int T, int N, int ldo, int splits, int accumulate, const int* __restrict__ live) {
    pdl_enter();
    const size_t tn = (size_t)T * N, used = (size_t)live_rows(live, T) * N;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < used; e += (size_t)gridDim.x * blockDim.x) {
        const int t = (int)(e / N), n = (int)(e % N);
        float v = 0.0f;
        for (int z = 0; z < splits; ++z) v += part[(size_t)z * tn + e];
        v += bias ? bias[n] : 0.0f;
        float* o = out + (size_t)t * ldo + n;
        *o = accumulate ? *o + v : v;
    }
}

// y[t] = x[t]·r[t]·w, r[t] = 1/sqrt(mean(x[t]²) + eps) (saved for the backward).
// y, x f32 [T, D], w bf16 [D], r f32 [T]. Launch: grid T, block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_rmsnorm_fwd_f32(float* __restrict__ y, float* __restrict__ r, const float* __restrict__ x,
                       const bf16_t* __restrict__ w, int D, float eps) {
    pdl_enter();
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float* xr = x + row * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    if (threadIdx.x == 0) r[row] = inv;
    for (int i = threadIdx.x; i < D; i += blockDim.x) y[row * D + i] = xr[i] * inv * bf2f(w[i]);
}

// dx[t] += r·(w ⊙ dy) − x·(r³/D)·Σ_i x_i w_i dy_i (the input gradient of vg_rmsnorm_fwd_f32).
// dx, dy, x f32 [T, D], r f32 [T], w bf16 [D]. Launch: grid T, block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_rmsnorm_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ x,
                       const float* __restrict__ r, const bf16_t* __restrict__ w, int D) {
    pdl_enter();
    __shared__ float scratch[32];
    const size_t row = blockIdx.x;
    const float *xr = x + row * D, *dyr = dy + row * D;
    float s = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += xr[i] * bf2f(w[i]) * dyr[i];
    s = block_sum(s, scratch);
    const float ri = r[row];
    const float c = ri * ri * ri * s / (float)D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) dx[row * D + i] += ri * bf2f(w[i]) * dyr[i] - xr[i] * c;
}

// Rotary embedding in place ("rotate half" pairs (i, i + half)) of the first heads·2·half
// columns of x [T, ld], row t at position pos0 + t; angle = f32(pos)·inv_freq[i] in f32, the
// precise sinf/cosf of it. `inverse` rotates by −angle (the transpose: the backward).
// Launch: grid-stride over T·heads·half, block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_rope_f32(float* __restrict__ x, const float* __restrict__ inv_freq, int T, int heads, int half, int ld,
                int pos0, int inverse) {
    pdl_enter();
    const long total = (long)T * heads * half;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const int i = (int)(e % half), h = (int)((e / half) % heads), t = (int)(e / ((long)half * heads));
        const float angle = (float)(pos0 + t) * inv_freq[i];
        float s = sinf(angle);
        const float c = cosf(angle);
        if (inverse) s = -s;
        float* p = x + (size_t)t * ld + (size_t)h * 2 * half;
        const float a = p[i], b = p[i + half];
        p[i] = a * c - b * s;
        p[i + half] = b * c + a * s;
    }
}

// Key/value row j (absolute) of kv head g: the frozen prefix (j < S0, rows of Hkv·Dh) or the
// active rows (row j − S0 of a matrix with row stride ld).
__device__ __forceinline__ const float* vg_kv_row(const float* pre, const float* act, int j, int g, int S0, int Hkv,
                                                  int Dh, int ld) {
    return j < S0 ? pre + ((size_t)j * Hkv + g) * Dh : act + (size_t)(j - S0) * ld + (size_t)g * Dh;
}

// Attention of the active rows (query i at position S0 + i; keys 0..S0+Ta−1, the first S0 from
// the frozen prefix), as small matrix products per kv head g over materialised scores
// sc, ds f32 [Ta·H, S] (S = S0 + Ta; row i·H + h; only keys j ≤ S0 + i are written or read):
//   forward:  sc = scale·q·kᵀ (vg_attn_scores_f32); sc = softmax rows, lse (vg_attn_softmax_f32);
//             out = sc·v (vg_attn_apply_f32)
//   backward: sc = scale·q·kᵀ, ds = dout·vᵀ (scores); sc = P = exp(sc − lse),
//             ds = P·(ds − Σ_j P·ds) (vg_attn_dsoftmax_f32); dq = scale·ds·k (apply);
//             dk = scale·dsᵀ·q, dv = Pᵀ·dout (vg_attn_kv_grad_f32)
// The product kernels tile 64 × 64 outputs over 16-wide steps of their sum (in order within a
// thread, as vg_mm_f32); the rows of a tile are the (query, head) pairs m = i·group + hh of one kv
// head (h = g·group + hh, group = H / Hkv), so each k/v row loaded serves the whole group.
// Launch of the products: block 256 (16 × 16 threads, 4 × 4 outputs each), grid z = Hkv.

// sc[(i·H + h)·S + j] = scale·Σ_d x[i·ldx + h·Dh + d]·y(j)[d] for j ≤ S0 + i, y(j) =
// vg_kv_row(y_pre, y, j, g, ...). Tiles whose first key is after every row's position exit.
// Launch: grid (ceil(S / 64), ceil(Ta·group / 64), Hkv).
extern "C" __global__ void __launch_bounds__(256)
    vg_attn_scores_f32(float* __restrict__ sc, const float* __restrict__ x, const float* __restrict__ y_pre,
                       const float* __restrict__ y, int Ta, int H, int Hkv, int Dh, int S0, int ld, int ldx,
                       float scale) {
    pdl_enter();
    __shared__ float As[VG_K][VG_T + 1];  // [d][m]
    __shared__ float Bs[VG_K][VG_N + 1];  // [d][j]
    const int group = H / Hkv, g = blockIdx.z, M = Ta * group, S = S0 + Ta;
    const int m0 = blockIdx.y * 64, j0 = blockIdx.x * 64;
    if (j0 > S0 + min(Ta - 1, (m0 + 63) / group)) return;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
    tile_zero(acc);
    for (int d0 = 0; d0 < Dh; d0 += 16) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int e = tid + r * 256, row = e >> 4, dd = e & 15, d = d0 + dd;
            const int m = m0 + row, j = j0 + row;
            float a = 0.0f, b = 0.0f;
            if (m < M && d < Dh) a = x[(size_t)(m / group) * ldx + (size_t)(g * group + m % group) * Dh + d];
            if (j < S && d < Dh) b = vg_kv_row(y_pre, y, j, g, S0, Hkv, Dh, ld)[d];
            As[dd][row] = a;
            Bs[dd][row] = b;
        }
        __syncthreads();
        tile_fma(acc, As, Bs, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int m = m0 + ty + 16 * p;
        if (m >= M) continue;
        const int i = m / group, h = g * group + m % group;
        float* row = sc + ((size_t)i * H + h) * S;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int j = j0 + tx + 16 * q;
            if (j <= S0 + i) row[j] = acc[p][q] * scale;
        }
    }
}

// Row i·H + h of sc: keys j ≤ S0 + i, p_j = exp(sc_j − max) / Σ, written over sc;
// lse[i·H + h] = max + log Σ. Launch: grid Ta·H, block 128.
extern "C" __global__ void __launch_bounds__(128)
    vg_attn_softmax_f32(float* __restrict__ sc, float* __restrict__ lse, int Ta, int H, int S0) {
    pdl_enter();
    __shared__ float scratch[32];
    const int ih = blockIdx.x, n = S0 + ih / H + 1;
    float* row = sc + (size_t)ih * (S0 + Ta);
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < n; j += blockDim.x) mx = fmaxf(mx, row[j]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float p = expf(row[j] - mx);
        row[j] = p;
        sum += p;
    }
    sum = block_sum(sum, scratch);
    const float inv = 1.0f / sum;
    for (int j = threadIdx.x; j < n; j += blockDim.x) row[j] *= inv;  // this thread's own entries
    if (threadIdx.x == 0) lse[ih] = mx + logf(sum);
}

// Row i·H + h, keys j ≤ S0 + i: P_j = exp(sc_j − lse) written over sc, δ = Σ_j P_j·ds_j,
// ds_j = P_j·(ds_j − δ). Launch: grid Ta·H, block 128.
extern "C" __global__ void __launch_bounds__(128)
    vg_attn_dsoftmax_f32(float* __restrict__ sc, float* __restrict__ ds, const float* __restrict__ lse, int Ta,
                         int H, int S0) {
    pdl_enter();
    __shared__ float scratch[32];
    const int ih = blockIdx.x, n = S0 + ih / H + 1;
    const size_t o = (size_t)ih * (S0 + Ta);
    const float l = lse[ih];
    float delta = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float p = expf(sc[o + j] - l);
        sc[o + j] = p;
        delta += p * ds[o + j];
    }
    delta = block_sum(delta, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x) ds[o + j] = sc[o + j] * (ds[o + j] - delta);
}

// out[i·ldo + h·Dh + d] = alpha·Σ_{j ≤ S0 + i} w[(i·H + h)·S + j]·y(j)[d].
// Launch: grid (ceil(Dh / 64), ceil(Ta·group / 64), Hkv).
extern "C" __global__ void __launch_bounds__(256)
    vg_attn_apply_f32(float* __restrict__ out, const float* __restrict__ w, const float* __restrict__ y_pre,
                      const float* __restrict__ y, int Ta, int H, int Hkv, int Dh, int S0, int ld, int ldo,
                      float alpha) {
    pdl_enter();
    __shared__ float As[VG_K][VG_T + 1];  // [j][m]
    __shared__ float Bs[VG_K][VG_N + 1];  // [j][d]
    const int group = H / Hkv, g = blockIdx.z, M = Ta * group, S = S0 + Ta;
    const int m0 = blockIdx.y * 64, d0 = blockIdx.x * 64;
    const int jn = S0 + min(Ta - 1, (m0 + 63) / group) + 1;  // keys any row of the tile sees
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
    tile_zero(acc);
    for (int j0 = 0; j0 < jn; j0 += 16) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int e = tid + r * 256;
            const int row = e >> 4, jj = e & 15, m = m0 + row, j = j0 + jj;  // lanes walk j
            float a = 0.0f;
            if (m < M) {
                const int i = m / group;
                if (j <= S0 + i) a = w[((size_t)i * H + g * group + m % group) * S + j];
            }
            As[jj][row] = a;
            const int jb = j0 + (e >> 6), dd = e & 63, d = d0 + dd;  // lanes walk d
            Bs[e >> 6][dd] = (jb < jn && d < Dh) ? vg_kv_row(y_pre, y, jb, g, S0, Hkv, Dh, ld)[d] : 0.0f;
        }
        __syncthreads();
        tile_fma(acc, As, Bs, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int m = m0 + ty + 16 * p;
        if (m >= M) continue;
        float* o = out + (size_t)(m / group) * ldo + (size_t)(g * group + m % group) * Dh;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int d = d0 + tx + 16 * q;
            if (d < Dh) o[d] = alpha * acc[p][q];
        }
    }
}

// Active key j < Ta (position S0 + j) of kv head g, seen by queries i ≥ j:
//   dkv[j·ldd + g·Dh + d] = alpha·Σ_{i ≥ j, hh} w[(i·H + h)·S + S0 + j]·x[i·ldx + h·Dh + d].
// Launch: grid (ceil(Dh / 64), ceil(Ta / 64), Hkv).
extern "C" __global__ void __launch_bounds__(256)
    vg_attn_kv_grad_f32(float* __restrict__ dkv, const float* __restrict__ w, const float* __restrict__ x, int Ta,
                        int H, int Hkv, int Dh, int S0, int ldx, int ldd, float alpha) {
    pdl_enter();
    __shared__ float As[VG_K][VG_T + 1];  // [m][j]
    __shared__ float Bs[VG_K][VG_N + 1];  // [m][d]
    const int group = H / Hkv, g = blockIdx.z, M = Ta * group, S = S0 + Ta;
    const int j0 = blockIdx.y * 64, d0 = blockIdx.x * 64;
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    float acc[4][4];
    tile_zero(acc);
    for (int mb = j0 * group; mb < M; mb += 16) {  // rows i < j0 see no key of this tile
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int e = tid + r * 256, mm = e >> 6, m = mb + mm;
            const int jr = e & 63, j = j0 + jr;  // lanes walk j (w) and d (x)
            float a = 0.0f, b = 0.0f;
            if (m < M) {
                const int i = m / group, h = g * group + m % group;
                if (j < Ta && i >= j) a = w[((size_t)i * H + h) * S + S0 + j];
                const int d = d0 + jr;
                if (d < Dh) b = x[(size_t)i * ldx + (size_t)h * Dh + d];
            }
            As[mm][jr] = a;
            Bs[mm][jr] = b;
        }
        __syncthreads();
        tile_fma(acc, As, Bs, tx, ty);
        __syncthreads();
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int j = j0 + ty + 16 * p;
        if (j >= Ta) continue;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            const int d = d0 + tx + 16 * q;
            if (d < Dh) dkv[(size_t)j * ldd + (size_t)g * Dh + d] = alpha * acc[p][q];
        }
    }
}

// act[t, f] = silu(g)·u with g = gu[t, f], u = gu[t, F + f]. act f32 [T, F], gu f32 [T, 2F].
// Launch: grid-stride over T·F, block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_silu_mul_fwd_f32(float* __restrict__ act, const float* __restrict__ gu, int T, int F) {
    pdl_enter();
    const long total = (long)T * F;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const long t = e / F, f = e % F;
        const float g = gu[t * 2 * F + f], u = gu[t * 2 * F + F + f];
        act[e] = g / (1.0f + expf(-g)) * u;
    }
}

// The backward of vg_silu_mul_fwd_f32, σ = sigmoid(g): dgu[t, f] = da·u·σ·(1 + g·(1 − σ)),
// dgu[t, F + f] = da·g·σ. dgu, gu f32 [T, 2F], dact f32 [T, F].
// Launch: grid (ceil(F / 256) ≤ 64, min(T, 65535)), block 256; both dims grid-stride.
extern "C" __global__ void __launch_bounds__(256)
    vg_silu_mul_bwd_f32(float* __restrict__ dgu, const float* __restrict__ dact, const float* __restrict__ gu, int T,
                        int F) {
    pdl_enter();
    // One row per blockIdx.y step, columns by grid-stride in x (keeps the index math in int).
    for (int t = blockIdx.y; t < T; t += gridDim.y) {
        const float* g_row = gu + (size_t)t * 2 * F;
        float* d_row = dgu + (size_t)t * 2 * F;
        const float* a_row = dact + (size_t)t * F;
        for (int f = blockIdx.x * blockDim.x + threadIdx.x; f < F; f += gridDim.x * blockDim.x) {
            const float g = g_row[f], u = g_row[F + f], da = a_row[f];
            const float s = 1.0f / (1.0f + expf(-g));
            d_row[f] = da * u * s * (1.0f + g * (1.0f - s));
            d_row[F + f] = da * g * s;
        }
    }
}

// Cross-entropy of softmax(c·z[r]) at y[r] per row: loss[r] = lse − c·z[r, y], lse =
// log Σ exp(c·z); with want_grad, z[r] is overwritten by c·(softmax(c·z) − onehot(y)).
// z f32 [R, V], y i32 [R], loss f32 [R]. Launch: grid R, block 1024.
extern "C" __global__ void __launch_bounds__(1024)
    vg_xent_f32(float* __restrict__ z, float* __restrict__ loss, const int* __restrict__ y, int V, float c,
                int want_grad) {
    pdl_enter();
    __shared__ float scratch[32];
    float* zr = z + (size_t)blockIdx.x * V;
    const int yr = y[blockIdx.x];
    const float zy = (yr >= 0 && yr < V) ? zr[yr] : __int_as_float(0x7fc00000);  // NaN: no such target
    // (zy is read before any thread overwrites the row: block_max below synchronises.)
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += blockDim.x) mx = fmaxf(mx, c * zr[i]);
    mx = block_max(mx, scratch);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) sum += expf(c * zr[i] - mx);
    sum = block_sum(sum, scratch);
    const float lse = mx + logf(sum);
    if (threadIdx.x == 0) loss[blockIdx.x] = lse - c * zy;
    if (want_grad)
        for (int i = threadIdx.x; i < V; i += blockDim.x) zr[i] = c * expf(c * zr[i] - lse) - (i == yr ? c : 0.0f);
}

// dst[r] = src[idx[r]] (gather, scatter_add == 0) or dst[idx[r]] += src[r] (scatter_add == 1;
// idx distinct). Rows of D floats; idx i32 [R]; indices outside 0..rows of the indexed matrix
// are skipped. Launch: grid-stride over R·D, block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_rows_f32(float* __restrict__ dst, const float* __restrict__ src, const int* __restrict__ idx, int R, int D,
                int rows, int scatter_add) {
    pdl_enter();
    const long total = (long)R * D;
    for (long e = blockIdx.x * (long)blockDim.x + threadIdx.x; e < total; e += (long)gridDim.x * blockDim.x) {
        const long r = e / D, i = e % D, o = (long)idx[r] * D + i;
        if (idx[r] < 0 || idx[r] >= rows) continue;
        if (scatter_add)
            dst[o] += src[e];
        else
            dst[e] = src[o];
    }
}

// The steer rows: add == 1: h[idx[r]] += v + extra (extra may be null) for r < R;
// add == 0: dv[i] = Σ_r h[idx[r], i] in the order of idx (the reduction into dL/dv).
// h f32 [rows, D], v f32 [D], idx i32 [R] (indices outside 0..rows are skipped).
// Launch: grid ceil(D / 256), block 256.
extern "C" __global__ void __launch_bounds__(256)
    vg_steer_rows_f32(float* __restrict__ h, float* __restrict__ v, const float* __restrict__ extra,
                      const int* __restrict__ idx, int R, int D, int rows, int add) {
    pdl_enter();
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= D) return;
    if (add) {
        const float a = v[i] + (extra ? extra[i] : 0.0f);
        for (int r = 0; r < R; ++r)
            if (idx[r] >= 0 && idx[r] < rows) h[(size_t)idx[r] * D + i] += a;
    } else {
        float s = 0.0f;
        for (int r = 0; r < R; ++r)
            if (idx[r] >= 0 && idx[r] < rows) s += h[(size_t)idx[r] * D + i];
        v[i] = s;
    }
}
