// residual_norm.cu: the fused residual add + steering add + RMSNorm (+ optional SAE encode).
//
// Per row t (all optional inputs may be null):
//   r[t] += x[t]                                         x f32 [T, D]
//   r[t] += coef[t] · table[idx[t]]   if coef[t] != 0 and 0 <= idx[t] < NV
//                                                         coef f32 [T], idx int32 [T], table f32 [NV, D]
//   y[t]  = bf16(r[t] · (1 / sqrt(mean(r[t]²) + eps)) · f32(w))          w bf16 [D], y bf16 [T, D]
//   SAE (when W_enc is given), on the updated r:
//     h    = sae_mean ? (r − sae_mean) / ‖r − sae_mean‖ : r             sae_mean f32 [D]
//     z[t] = W_encᵀ (h − b_dec) + b_enc                                  W_enc f32 [D, K], b_dec f32 [D],
//                                                                        b_enc f32 [K], z f32 [T, K]
//     category[t] = first k with z[t, k] = max_k z[t, k]                 int32 [T]
// Rounding: everything in f32; y is the only bf16 output, rounded once (RNE) at the end.
// The order x-add then steering-add matches the reference (r = (r + x) + c·v).
// Launch: grid (T), block RN_THREADS = 512, dynamic shared memory D·4 bytes (the row of h − b_dec
// for the SAE; 0 when there is no SAE). K ≤ 64; D % 4 == 0 and D ≤ 4·RN_VPT·512 = 8192 (float4
// loads held in registers).
#include "common.cuh"

#define SAE_MAX_K 64
#define RN_VPT 4

extern "C" __global__ void residual_norm_f32(
    float* __restrict__ r, const float* __restrict__ x, const float* __restrict__ steer_table,
    const float* __restrict__ coef, const int* __restrict__ idx, int NV, const bf16_t* __restrict__ w,
    bf16_t* __restrict__ y, int D, float eps, const float* __restrict__ W_enc, const float* __restrict__ b_enc,
    const float* __restrict__ b_dec, const float* __restrict__ sae_mean, float* __restrict__ z,
    int* __restrict__ category, int K) {
    pdl_enter();
    extern __shared__ float h_row[];  // [D], SAE only
    __shared__ float scratch[32];
    __shared__ float zpart[8][SAE_MAX_K];
    const int t = blockIdx.x;
    float* rr = r + (size_t)t * D;

    const float c = coef ? coef[t] : 0.0f;
    const int vi = idx ? idx[t] : -1;
    const float* sv = (c != 0.0f && vi >= 0 && vi < NV && steer_table) ? steer_table + (size_t)vi * D : nullptr;
    const float* xr = x ? x + (size_t)t * D : nullptr;

    // Thread i owns the float4 groups i, i + blockDim, … (at most RN_VPT of them): all loads are
    // issued before any is used, so the row costs one memory round trip, and the normalised
    // output is computed from registers.
    const int D4 = D >> 2;
    float4 v[RN_VPT];
#pragma unroll
    for (int j = 0; j < RN_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        v[j] = i < D4 ? reinterpret_cast<const float4*>(rr)[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    if (xr) {
#pragma unroll
        for (int j = 0; j < RN_VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < D4) {
                const float4 b = reinterpret_cast<const float4*>(xr)[i];
                v[j].x += b.x; v[j].y += b.y; v[j].z += b.z; v[j].w += b.w;
            }
        }
    }
    if (sv) {
#pragma unroll
        for (int j = 0; j < RN_VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < D4) {
                const float4 s = reinterpret_cast<const float4*>(sv)[i];
                v[j].x += c * s.x; v[j].y += c * s.y; v[j].z += c * s.z; v[j].w += c * s.w;
            }
        }
    }
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < RN_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < D4) {
            if (xr || sv) reinterpret_cast<float4*>(rr)[i] = v[j];
            ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
        }
    }
    ss = block_sum(ss, scratch);  // its barriers also publish the r writes to the whole block
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    if (y) {
        uint2* yr = reinterpret_cast<uint2*>(y + (size_t)t * D);
#pragma unroll
        for (int j = 0; j < RN_VPT; ++j) {
            const int i = threadIdx.x + j * blockDim.x;
            if (i < D4) {
                const uint2 wv = reinterpret_cast<const uint2*>(w)[i];
                yr[i] = make_uint2(pack_bf2(v[j].x * inv * bf_lo(wv.x), v[j].y * inv * bf_hi(wv.x)),
                                   pack_bf2(v[j].z * inv * bf_lo(wv.y), v[j].w * inv * bf_hi(wv.y)));
            }
        }
    }
    if (!W_enc) return;

    // SAE encode. h − b_dec goes to shared memory, then K columns of W_enc are dotted with it:
    // thread (k = tid % 64, g = tid / 64) sums d ≡ g (mod groups), so a warp reads 32 consecutive
    // floats of one W_enc row (coalesced).
    float scale = 1.0f;
    if (sae_mean) {
        float s2 = 0.0f;
        for (int i = threadIdx.x; i < D; i += blockDim.x) {
            float v = rr[i] - sae_mean[i];
            s2 += v * v;
        }
        s2 = block_sum(s2, scratch);
        scale = s2 > 0.0f ? 1.0f / sqrtf(s2) : 0.0f;
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float h = sae_mean ? (rr[i] - sae_mean[i]) * scale : rr[i];
        h_row[i] = h - (b_dec ? b_dec[i] : 0.0f);
    }
    __syncthreads();
    const int k = threadIdx.x % SAE_MAX_K, g = threadIdx.x / SAE_MAX_K;
    const int groups = blockDim.x / SAE_MAX_K;  // 8 for 512 threads (zpart's first dimension)
    float acc = 0.0f;
    if (k < K)
        for (int d = g; d < D; d += groups) acc += W_enc[(size_t)d * K + k] * h_row[d];
    zpart[g][k] = acc;
    __syncthreads();
    if (threadIdx.x < K) {
        float s = b_enc ? b_enc[threadIdx.x] : 0.0f;
        for (int j = 0; j < groups; ++j) s += zpart[j][threadIdx.x];
        z[(size_t)t * K + threadIdx.x] = s;
        zpart[0][threadIdx.x] = s;  // each thread overwrites only its own column, read above
    }
    __syncthreads();
    if (threadIdx.x == 0 && category) {
        int best = 0;
        for (int j = 1; j < K; ++j)
            if (zpart[0][j] > zpart[0][best]) best = j;
        category[t] = best;
    }
}
