// prefill_attention.cu: causal attention of a prefill chunk on tensor cores (flash-attention
// style: scores, online softmax and the value sum per key tile, nothing materialised).
//
// attention_prefill_bf16 — a chunk of n queries of ONE slot at positions p0 .. p0+n−1 (q bf16
//   [n, H, Dh]); query i attends cache positions 0 .. p0+i of k_cache/v_cache bf16
//   [slots, S, Hkv, Dh] (its own k/v already written by qkv_rope); GQA kv head h / (H / Hkv);
//   out bf16 [n, H, Dh]. Dh ∈ {64, 128}.
// Arithmetic: s = (q·k)·scale with q·k on tensor cores (bf16 in, f32 accumulate), scale =
//   1/sqrt(Dh) in f32; online softmax in f32 (running max m and sum l per row, expf); the
//   probabilities are rounded to bf16 (p ≤ 1, so by ≤ 2^-9 each) to multiply V on tensor cores
//   while l sums the f32 values; out = bf16(o / l), rounded once.
// Tiles: a block owns 64 queries of one head (4 warps × 16 rows, the mma's M) and walks the keys
//   0 .. p0 + last query in tiles of 64: K [key][d] and V transposed [d][key] in shared memory
//   (rows padded by 8 bf16 so the 8 rows of a fragment load hit distinct banks), so both products
//   read their B fragments as two consecutive bf16 of one row. A warp skips the tiles that lie
//   wholly after its last query. The score accumulators of one 16-key step are exactly the
//   A fragment of the P·V product for those keys (rows g and g+8, keys 2c.. and 2c+8..), so P
//   never leaves registers.
// Launch: grid (ceil(n / 64), H), block 128, 35 KB static shared memory.
#include "common.cuh"

#define FA_Q 64  // queries per block
#define FA_K 64  // keys per tile
#define FA_PAD 8
#define FA_SMEM (FA_K * (128 + FA_PAD) + 128 * (FA_K + FA_PAD))  // bf16 elements at Dh = 128

template <int DH>
__device__ __forceinline__ void prefill_fa(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                                           const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out, int n,
                                           int p0, int slot, int H, int Hkv, int S, bf16_t* smem) {
    bf16_t(*Ks)[DH + FA_PAD] = reinterpret_cast<bf16_t(*)[DH + FA_PAD]>(smem);                  // [key][d]
    bf16_t(*Vt)[FA_K + FA_PAD] = reinterpret_cast<bf16_t(*)[FA_K + FA_PAD]>(smem + FA_K * (DH + FA_PAD));  // [d][key]
    const int h = blockIdx.y, q0 = blockIdx.x * FA_Q, kvh = h / (H / Hkv);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, c = lane & 3;
    const float scale = rsqrtf((float)DH);
    const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;  // this lane's two query rows

    // Q as A fragments, one per 16-wide d step (rows ≥ n read as zeros; never stored).
    unsigned int qa[DH / 16][4];
    {
        const unsigned int* q0p = reinterpret_cast<const unsigned int*>(q + ((size_t)r0 * H + h) * DH);
        const unsigned int* q1p = reinterpret_cast<const unsigned int*>(q + ((size_t)r1 * H + h) * DH);
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk) {
            const int w = (16 * kk + 2 * c) / 2;  // 32-bit word of d = 16kk + 2c
            qa[kk][0] = r0 < n ? q0p[w] : 0u;
            qa[kk][1] = r1 < n ? q1p[w] : 0u;
            qa[kk][2] = r0 < n ? q0p[w + 4] : 0u;
            qa[kk][3] = r1 < n ? q1p[w + 4] : 0u;
        }
    }
    float o[DH / 8][4];
#pragma unroll
    for (int t = 0; t < DH / 8; ++t)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[t][e] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // l: this lane's share of the row sum

    const int last_q = min(q0 + FA_Q, n) - 1;
    const int n_keys = p0 + last_q + 1;                        // ≤ S (checked on the host)
    const int warp_last = p0 + min(q0 + warp * 16 + 15, last_q);  // this warp's last key
    const size_t kv_row = (size_t)Hkv * DH;
    const bf16_t* kb = k_cache + ((size_t)slot * S * Hkv + kvh) * DH;
    const bf16_t* vb = v_cache + ((size_t)slot * S * Hkv + kvh) * DH;
    for (int k0 = 0; k0 < n_keys; k0 += FA_K) {
        __syncthreads();  // every warp is done with the previous tile
        // 16-byte chunks: consecutive threads take consecutive keys (V's transposed stores then
        // hit consecutive addresses).
        for (int e = tid; e < FA_K * (DH / 8); e += 128) {
            const int j = e % FA_K, dc = (e / FA_K) * 8, kp = k0 + j;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
            if (kp < n_keys) {
                kv = *reinterpret_cast<const uint4*>(kb + kp * kv_row + dc);
                vv = *reinterpret_cast<const uint4*>(vb + kp * kv_row + dc);
            }
            *reinterpret_cast<uint4*>(&Ks[j][dc]) = kv;
            const unsigned int w4[4] = {vv.x, vv.y, vv.z, vv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                Vt[dc + 2 * i][j] = (bf16_t)(w4[i] & 0xffffu);
                Vt[dc + 2 * i + 1][j] = (bf16_t)(w4[i] >> 16);
            }
        }
        __syncthreads();
        if (k0 > warp_last) continue;  // every key of the tile is after this warp's queries

        // s = q·kᵀ for 16 rows × 64 keys (8 n-tiles of 8 keys). The B fragments are read inline
        // (through a fragment-loading helper ptxas spilled registers here).
        float s[FA_K / 8][4];
#pragma unroll
        for (int t = 0; t < FA_K / 8; ++t) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < DH / 16; ++kk) {
                const unsigned int b[2] = {*reinterpret_cast<const unsigned int*>(&Ks[t * 8 + g][16 * kk + 2 * c]),
                                           *reinterpret_cast<const unsigned int*>(&Ks[t * 8 + g][16 * kk + 2 * c + 8])};
                mma_bf16_16816(s[t], qa[kk], b);
            }
        }
        // Scale, causal mask (key > position), and the tile's row maxima over the quad.
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int t = 0; t < FA_K / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + t * 8 + 2 * c + (e & 1), pos = p0 + (e < 2 ? r0 : r1);
                s[t][e] = key > pos ? -INFINITY : s[t][e] * scale;
                if (e < 2)
                    mx0 = fmaxf(mx0, s[t][e]);
                else
                    mx1 = fmaxf(mx1, s[t][e]);
            }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // The first tile holds key 0 ≤ every position, so m is finite from then on.
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float c0 = expf(m0 - n0), c1 = expf(m1 - n1);
        m0 = n0;
        m1 = n1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int t = 0; t < DH / 8; ++t) {
            o[t][0] *= c0;
            o[t][1] *= c0;
            o[t][2] *= c1;
            o[t][3] *= c1;
        }
        // o += p·v, 16 keys per step; p from the score registers of n-tiles 2·kk and 2·kk + 1.
#pragma unroll
        for (int kk = 0; kk < FA_K / 16; ++kk) {
            float p[2][4];
#pragma unroll
            for (int u = 0; u < 2; ++u)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    p[u][e] = expf(s[2 * kk + u][e] - (e < 2 ? m0 : m1));
                    if (e < 2)
                        l0 += p[u][e];
                    else
                        l1 += p[u][e];
                }
            const unsigned int a[4] = {pack_bf2(p[0][0], p[0][1]), pack_bf2(p[0][2], p[0][3]),
                                       pack_bf2(p[1][0], p[1][1]), pack_bf2(p[1][2], p[1][3])};
#pragma unroll
            for (int t = 0; t < DH / 8; ++t) {
                const unsigned int b[2] = {*reinterpret_cast<const unsigned int*>(&Vt[t * 8 + g][16 * kk + 2 * c]),
                                           *reinterpret_cast<const unsigned int*>(&Vt[t * 8 + g][16 * kk + 2 * c + 8])};
                mma_bf16_16816(o[t], a, b);
            }
        }
    }
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.0f / l0, i1 = 1.0f / l1;
#pragma unroll
    for (int t = 0; t < DH / 8; ++t) {
        const int d = t * 8 + 2 * c;
        if (r0 < n)
            *reinterpret_cast<unsigned int*>(out + ((size_t)r0 * H + h) * DH + d) = pack_bf2(o[t][0] * i0, o[t][1] * i0);
        if (r1 < n)
            *reinterpret_cast<unsigned int*>(out + ((size_t)r1 * H + h) * DH + d) = pack_bf2(o[t][2] * i1, o[t][3] * i1);
    }
}

extern "C" __global__ void __launch_bounds__(128)
    attention_prefill_bf16(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                           const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out, int n, int p0, int slot,
                           int H, int Hkv, int Dh, int S) {
    pdl_enter();
    // One allocation for both head sizes (laid out inside prefill_fa).
    __shared__ __align__(16) bf16_t smem[FA_SMEM];
    if (Dh == 128)
        prefill_fa<128>(q, k_cache, v_cache, out, n, p0, slot, H, Hkv, S, smem);
    else if (Dh == 64)
        prefill_fa<64>(q, k_cache, v_cache, out, n, p0, slot, H, Hkv, S, smem);
}
