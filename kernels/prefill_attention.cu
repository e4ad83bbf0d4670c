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
//   0 .. p0 + last query in tiles of 64 through a 2-stage cp.async ring: K and V tiles [key][d]
//   in shared memory as in the cache (rows padded by 8 bf16, so the 8 rows of an ldmatrix phase
//   hit distinct banks); tile j + 1 loads while tile j is multiplied. B fragments come by
//   ldmatrix: K's as stored (q·kᵀ: the key is the B column), V's transposed (.trans; p·v: the
//   key is the k index). A warp skips the tiles that lie wholly after its last query. The score
//   accumulators of one 16-key step are exactly the A fragment of the P·V product for those keys
//   (rows g and g+8, keys 2c.. and 2c+8..), so P never leaves registers.
// Launch: grid (ceil(n / 64), H), block 128, dynamic shared memory 2 stages × (K + V) tiles:
//   4·64·(Dh + 8)·2 bytes (69,632 at Dh = 128, above the 48 KB default: the host raises the
//   kernel's limit).
//
// attention_runs_bf16 — the same tiles over the rows of a decode call with read-only runs
//   (src/model.rs Step): a run is rows of one slot at consecutive positions p0 .. p0+len−1; its
//   query i attends the cache positions 0 .. p0−1, then the run's own K/V rows 0 .. i, taken from
//   k_self / v_self bf16 [T, Hkv, Dh] (the call's rotated K/V; a row that writes the cache is a
//   run of one, its own key read from k_self, equal to what it wrote). tiles int32 [n_tiles, 5]:
//   (first row of the run, len, first query of the tile within the run, p0, slot); a tile covers
//   queries q0 .. min(q0 + 64, len) − 1. q / out bf16 [T, H, Dh]. Each K/V row loaded serves up to
//   64 queries of a run, where the decode kernels load it once per query.
//   Launch: grid (n_tiles, H), block 128, the same shared memory.
#include "common.cuh"

#define FA_Q 64  // queries per block
#define FA_K 64  // keys per tile
#define FA_PAD 8

// Queries q0 .. q0+63 (< n) of q / out [n, H, Dh] at positions p0 + row; keys below p0 from the
// cache of `slot`, keys from p0 on from k_self / v_self [n, Hkv, Dh] when given (else the cache).
template <int DH>
__device__ __forceinline__ void prefill_fa(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                                           const bf16_t* __restrict__ v_cache, const bf16_t* __restrict__ k_self,
                                           const bf16_t* __restrict__ v_self, bf16_t* __restrict__ out, int n,
                                           int q0, int p0, int slot, int H, int Hkv, int S, bf16_t* smem) {
    typedef bf16_t Tile[FA_K][DH + FA_PAD];  // [key][d]
    Tile* Ks = reinterpret_cast<Tile*>(smem);  // [stage]
    Tile* Vs = Ks + 2;
    const int h = blockIdx.y, kvh = h / (H / Hkv);
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
    const bf16_t* ksb = k_self ? k_self + (size_t)kvh * DH : nullptr;
    const bf16_t* vsb = v_self ? v_self + (size_t)kvh * DH : nullptr;
    // Key tile k0 into stage st, as one commit group (keys ≥ n_keys zero-filled).
    auto load_tile = [&](int k0, int st) {
        if (k0 < n_keys) {
            for (int e = tid; e < FA_K * (DH / 8); e += 128) {
                const int j = e / (DH / 8), dc = (e % (DH / 8)) * 8, kp = k0 + j;
                const bool ok = kp < n_keys, own = ksb && kp >= p0;
                const size_t at = own ? (size_t)(kp - p0) * kv_row : (size_t)kp * kv_row;
                cp_async16(&Ks[st][j][dc], ok ? (own ? ksb : kb) + at + dc : kb, ok ? 16 : 0);
                cp_async16(&Vs[st][j][dc], ok ? (own ? vsb : vb) + at + dc : vb, ok ? 16 : 0);
            }
        }
        cp_async_commit();
    };
    // ldmatrix row addresses. K (B of q·kᵀ, two 8-key n-tiles per x4): matrices keys +0 / +8
    // (bit 1 of l / 8) × d +0 / +8 (bit 0). V (B of p·v, transposed, two 8-wide d n-tiles per
    // x4): matrices keys +0 / +8 (bit 0) × d +0 / +8 (bit 1).
    const int k_key = (lane & 7) + (lane >> 4) * 8, k_d = ((lane >> 3) & 1) * 8;
    const int v_key = (lane & 7) + ((lane >> 3) & 1) * 8, v_d = (lane >> 4) * 8;

    load_tile(0, 0);
    for (int k0 = 0, st = 0; k0 < n_keys; k0 += FA_K, st ^= 1) {
        __syncthreads();  // every warp is done with the other stage (the tile before this one)...
        load_tile(k0 + FA_K, st ^ 1);  // ...which the next tile refills
        cp_async_wait<1>();  // this thread's copies of this tile have landed
        __syncthreads();     // everyone's have
        if (k0 > warp_last) continue;  // every key of the tile is after this warp's queries

        // s = q·kᵀ for 16 rows × 64 keys (8 n-tiles of 8 keys).
        float s[FA_K / 8][4];
#pragma unroll
        for (int t = 0; t < FA_K / 8; ++t)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[t][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < DH / 16; ++kk)
#pragma unroll
            for (int t = 0; t < FA_K / 8; t += 2) {
                unsigned int r[4];
                ldmatrix_x4(r, &Ks[st][t * 8 + k_key][16 * kk + k_d]);
                const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                mma_bf16_16816(s[t], qa[kk], b0);
                mma_bf16_16816(s[t + 1], qa[kk], b1);
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
            for (int t = 0; t < DH / 8; t += 2) {
                unsigned int r[4];
                ldmatrix_x4_trans(r, &Vs[st][16 * kk + v_key][t * 8 + v_d]);
                const unsigned int b0[2] = {r[0], r[1]}, b1[2] = {r[2], r[3]};
                mma_bf16_16816(o[t], a, b0);
                mma_bf16_16816(o[t + 1], a, b1);
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

// On sm_90 shared memory fits 3 blocks per SM; ask ptxas for registers to match (168, no spills;
// 170 unbounded would fit 2). Elsewhere shared memory allows at most 2 (sm_80) or 1 (sm_86/89).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FA_BOUNDS __launch_bounds__(128, 3)
#else
#define FA_BOUNDS __launch_bounds__(128)
#endif

extern "C" __global__ void FA_BOUNDS
    attention_prefill_bf16(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                           const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out, int n, int p0, int slot,
                           int H, int Hkv, int Dh, int S) {
    pdl_enter();
    extern __shared__ uint4 fa_smem[];  // laid out inside prefill_fa
    bf16_t* smem = reinterpret_cast<bf16_t*>(fa_smem);
    const int q0 = blockIdx.x * FA_Q;
    if (Dh == 128)
        prefill_fa<128>(q, k_cache, v_cache, nullptr, nullptr, out, n, q0, p0, slot, H, Hkv, S, smem);
    else if (Dh == 64)
        prefill_fa<64>(q, k_cache, v_cache, nullptr, nullptr, out, n, q0, p0, slot, H, Hkv, S, smem);
}

extern "C" __global__ void FA_BOUNDS
    attention_runs_bf16(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                        const bf16_t* __restrict__ v_cache, const bf16_t* __restrict__ k_self,
                        const bf16_t* __restrict__ v_self, bf16_t* __restrict__ out, const int* __restrict__ tiles,
                        int H, int Hkv, int Dh, int S) {
    pdl_enter();
    extern __shared__ uint4 fa_smem[];  // laid out inside prefill_fa
    bf16_t* smem = reinterpret_cast<bf16_t*>(fa_smem);
    const int* tl = tiles + (size_t)blockIdx.x * 5;
    const int first = tl[0], len = tl[1], q0 = tl[2], p0 = tl[3], slot = tl[4];
    const size_t qr = (size_t)first * H * Dh, kr = (size_t)first * Hkv * Dh;
    if (Dh == 128)
        prefill_fa<128>(q + qr, k_cache, v_cache, k_self + kr, v_self + kr, out + qr, len, q0, p0, slot, H, Hkv, S,
                        smem);
    else if (Dh == 64)
        prefill_fa<64>(q + qr, k_cache, v_cache, k_self + kr, v_self + kr, out + qr, len, q0, p0, slot, H, Hkv, S,
                       smem);
}
