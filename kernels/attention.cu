// attention.cu: attention over the bf16 KV cache, decode (flash-decoding) and prefill (tiled).
//
// Common: GQA, kv head = h / (H / Hkv); scale 1/sqrt(Dh); scores, softmax and accumulation in f32
// (exp is the precise expf); the output is rounded to bf16 once. Dh ∈ {64, 128}.
// Caches bf16 [slots, S, Hkv, Dh].
//
// attention_decode_bf16 — token t (query heads q[t] bf16 [T, H, Dh]) attends positions
//   0 .. pos[t]−1 of k_cache/v_cache[slot[t]] plus its own k_self/v_self[t] (bf16 [T, Hkv, Dh]) at
//   position pos[t]: L = pos[t] + 1 keys. Rows that did not write the cache still see themselves.
//   The keys are cut into splits of `chunk` positions; split sp writes its unnormalised partial
//     part_o[t, h, sp] = Σ_j exp(s_j − m_sp) · v_j    f32 [T, H, NS, Dh]
//     part_ml[t, h, sp] = (m_sp, Σ_j exp(s_j − m_sp)) f32 [T, H, NS, 2]
//   and the last used split of (t, h) to finish (counted with an atomic in counters[t, h], u32
//   [T, H], zero before the launch and left zero after it) combines them:
//     out[t, h] = bf16(Σ_sp e^{m_sp−M} part_o / Σ_sp e^{m_sp−M} l_sp) over the ceil(L/chunk) used
//     splits, M = max m_sp.
//   Launch: grid (NS, H, T), block 256 (DEC_WARPS = 8 warps, keys strided over warps, Dh/32 dims
//   per lane); attention_decode_bf16 takes 8 keys per warp step (a split in one memory round trip,
//   for launches of few blocks), attention_decode_u1_bf16 one (fewer registers, more blocks per
//   SM). NS is fixed by the caller (ceil(max context / chunk)); splits with sp·chunk ≥ L return
//   at once, so the launch does not depend on lengths (CUDA graphs).
// attention_prefill_bf16 — a chunk of n queries of ONE slot at positions p0 .. p0+n−1 (q bf16
//   [n, H, Dh]); query i attends cache positions 0 .. p0+i (its own k/v was already written by
//   qkv_rope). Tiled, CUDA cores (no tensor cores yet): a block holds 32 queries of one head,
//   streams 32-key tiles of K and V through shared memory, 8 warps × 4 queries each, online
//   softmax per query. Launch: grid (ceil(n/32), H), block 256.
#include "common.cuh"

#define MAX_DH 128
// Warps per decode-attention block. Each warp takes U keys per step (U = 8: a 64-key split in
// one step, for launches of few blocks; U = 1: fewer registers, for launches of many blocks).
#define DEC_WARPS 8

// Loads NPL consecutive bf16 (this lane's share of a Dh-row) as f32.
template <int NPL>
__device__ __forceinline__ void load_row_part(const bf16_t* row, int lane, float* out) {
    const bf16_t* p = row + lane * NPL;
    if (NPL == 4) {
        uint2 w = *reinterpret_cast<const uint2*>(p);
        out[0] = bf_lo(w.x); out[1] = bf_hi(w.x); out[2] = bf_lo(w.y); out[3] = bf_hi(w.y);
    } else if (NPL == 2) {
        unsigned int w = *reinterpret_cast<const unsigned int*>(p);
        out[0] = bf_lo(w); out[1] = bf_hi(w);
    } else {
#pragma unroll
        for (int i = 0; i < NPL; ++i) out[i] = bf2f(p[i]);
    }
}

template <int NPL, int U>
__device__ void decode_split(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                             const bf16_t* __restrict__ v_cache, const bf16_t* __restrict__ k_self,
                             const bf16_t* __restrict__ v_self, const int* __restrict__ pos,
                             const int* __restrict__ slot, float* __restrict__ part_o,
                             float* __restrict__ part_ml, bf16_t* __restrict__ out,
                             unsigned int* __restrict__ counters, int H, int Hkv, int S, int slots, int chunk,
                             int NS) {
    pdl_enter();
    constexpr int DH = NPL * 32;
    __shared__ float sm_m[DEC_WARPS], sm_l[DEC_WARPS];
    __shared__ float sm_acc[DEC_WARPS][DH];
    const int sp = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int p = pos[t];
    const int L = p + 1;
    const int j0 = sp * chunk;
    if (j0 >= L) return;
    const int j1 = min(j0 + chunk, L);
    const int kvh = h / (H / Hkv);
    const int s = slot[t];
    // Cache positions actually readable: an out-of-range slot or pos reads only the token itself.
    const int cache_len = (s >= 0 && s < slots) ? min(p, S) : 0;

    float qv[NPL];
    load_row_part<NPL>(q + ((size_t)t * H + h) * DH, lane, qv);
    const float scale = rsqrtf((float)DH);
#pragma unroll
    for (int i = 0; i < NPL; ++i) qv[i] *= scale;

    float m = -INFINITY, l = 0.0f, acc[NPL];
#pragma unroll
    for (int i = 0; i < NPL; ++i) acc[i] = 0.0f;
    const bf16_t* kself = k_self + ((size_t)t * Hkv + kvh) * DH;
    const bf16_t* vself = v_self + ((size_t)t * Hkv + kvh) * DH;
    // Warp w takes keys j0 + w + DEC_WARPS·i, U of them per step: all their K and V loads are
    // issued before any score is used, so a split of 64 keys costs one memory round trip.
    for (int jb = j0 + warp; jb < j1; jb += DEC_WARPS * U) {
        float kv[U][NPL], vv[U][NPL];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = jb + DEC_WARPS * u;
            // Cache positions past cache_len (an out-of-range slot) are skipped; the token itself
            // (j == p) reads k_self / v_self.
            ok[u] = j < j1 && (j >= p || j < cache_len);
            const bf16_t *kr = kself, *vr = vself;
            if (j < p) {
                const size_t off = (((size_t)s * S + j) * Hkv + kvh) * DH;
                kr = k_cache + off;
                vr = v_cache + off;
            }
            if (ok[u]) {
                load_row_part<NPL>(kr, lane, kv[u]);
                load_row_part<NPL>(vr, lane, vv[u]);
            }
        }
        float sc[U];
        float m_new = m;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float d = 0.0f;
            if (ok[u]) {
#pragma unroll
                for (int i = 0; i < NPL; ++i) d += qv[i] * kv[u][i];
            }
            sc[u] = ok[u] ? warp_sum(d) : -INFINITY;  // ok[u] is the same on every lane
            m_new = fmaxf(m_new, sc[u]);
        }
        if (m_new == -INFINITY) continue;  // no key in this step
        const float corr = expf(m - m_new);  // 0 on the first step (m = −inf)
        l *= corr;
#pragma unroll
        for (int i = 0; i < NPL; ++i) acc[i] *= corr;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (!ok[u]) continue;
            const float e = expf(sc[u] - m_new);
            l += e;
#pragma unroll
            for (int i = 0; i < NPL; ++i) acc[i] += e * vv[u][i];
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
#pragma unroll
    for (int i = 0; i < NPL; ++i) sm_acc[warp][lane * NPL + i] = acc[i];
    __syncthreads();
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) M = fmaxf(M, sm_m[w]);
    float f[DEC_WARPS];
#pragma unroll
    for (int w = 0; w < DEC_WARPS; ++w) f[w] = sm_m[w] == -INFINITY ? 0.0f : expf(sm_m[w] - M);
    const size_t base = ((size_t)t * H + h) * NS + sp;
    for (int d = threadIdx.x; d < DH; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) o += f[w] * sm_acc[w][d];
        part_o[base * DH + d] = o;
    }
    if (threadIdx.x == 0) {
        float lw = 0.0f;
#pragma unroll
        for (int w = 0; w < DEC_WARPS; ++w) lw += f[w] * sm_l[w];
        part_ml[base * 2] = M;
        part_ml[base * 2 + 1] = lw;
    }

    // The last split of (t, h) to finish combines all of them (no second launch). Its counter is
    // left at 0 for the next launch.
    const int used = min((L + chunk - 1) / chunk, NS);
    __shared__ bool is_last;
    __threadfence();  // publish this split's partials before counting it
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned int* cnt = counters + (size_t)t * H + h;
        is_last = atomicAdd(cnt, 1u) == (unsigned int)(used - 1);
        if (is_last) *cnt = 0u;
    }
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // Combine: the used splits' maxima and sums are read by all threads at once (block
    // reductions), then each thread sums its dims over the splits with U loads in flight.
    const size_t b0 = ((size_t)t * H + h) * NS;
    __shared__ float sw[32];
    // Maximum over all used splits, then weights e^{m_sp − M}.
    float MM = -INFINITY;
    for (int q2 = threadIdx.x; q2 < used; q2 += blockDim.x) MM = fmaxf(MM, __ldcg(part_ml + (b0 + q2) * 2));
    MM = block_max(MM, sw);
    float lpart = 0.0f;
    for (int q2 = threadIdx.x; q2 < used; q2 += blockDim.x)
        lpart += expf(__ldcg(part_ml + (b0 + q2) * 2) - MM) * __ldcg(part_ml + (b0 + q2) * 2 + 1);
    const float inv = 1.0f / block_sum(lpart, sw);
    for (int d = threadIdx.x; d < DH; d += blockDim.x) {
        float o = 0.0f;
#pragma unroll 8
        for (int q2 = 0; q2 < used; ++q2)
            o += expf(__ldcg(part_ml + (b0 + q2) * 2) - MM) * __ldcg(part_o + (b0 + q2) * DH + d);
        out[((size_t)t * H + h) * DH + d] = f2bf(o * inv);
    }
}

#define DECODE_KERNEL(NAME, U)                                                                                    \
    extern "C" __global__ void NAME(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,            \
                                    const bf16_t* __restrict__ v_cache, const bf16_t* __restrict__ k_self,       \
                                    const bf16_t* __restrict__ v_self, const int* __restrict__ pos,              \
                                    const int* __restrict__ slot, float* __restrict__ part_o,                    \
                                    float* __restrict__ part_ml, bf16_t* __restrict__ out,                       \
                                    unsigned int* __restrict__ counters, int H, int Hkv, int Dh, int S, int slots, \
                                    int chunk, int NS) {                                                         \
        if (Dh == 128)                                                                                           \
            decode_split<4, U>(q, k_cache, v_cache, k_self, v_self, pos, slot, part_o, part_ml, out, counters, H, \
                               Hkv, S, slots, chunk, NS);                                                        \
        else if (Dh == 64)                                                                                       \
            decode_split<2, U>(q, k_cache, v_cache, k_self, v_self, pos, slot, part_o, part_ml, out, counters, H, \
                               Hkv, S, slots, chunk, NS);                                                        \
    }
DECODE_KERNEL(attention_decode_bf16, 8)
DECODE_KERNEL(attention_decode_u1_bf16, 1)

#define PF_Q 32   // queries per block
#define PF_K 32   // keys per tile
#define PF_QPW 4  // queries per warp (8 warps)

template <int NPL>
__device__ void prefill_tile(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                             const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out, int n, int p0, int s,
                             int H, int Hkv, int S, float (*sq)[MAX_DH], bf16_t (*sk)[MAX_DH + 2],
                             bf16_t (*sv)[MAX_DH]) {
    constexpr int DH = NPL * 32;
    const int h = blockIdx.y, q0 = blockIdx.x * PF_Q;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kvh = h / (H / Hkv);
    const float scale = rsqrtf((float)DH);

    for (int e = threadIdx.x; e < PF_Q * DH; e += blockDim.x) {
        const int i = e / DH, d = e % DH;
        sq[i][d] = q0 + i < n ? bf2f(q[((size_t)(q0 + i) * H + h) * DH + d]) * scale : 0.0f;
    }
    float m[PF_QPW], l[PF_QPW], acc[PF_QPW][NPL];
#pragma unroll
    for (int a = 0; a < PF_QPW; ++a) {
        m[a] = -INFINITY;
        l[a] = 0.0f;
#pragma unroll
        for (int i = 0; i < NPL; ++i) acc[a][i] = 0.0f;
    }
    const int last_q = min(q0 + PF_Q, n) - 1;
    const int n_keys = min(p0 + last_q + 1, S);  // keys 0 .. p0 + last_q
    for (int k0 = 0; k0 < n_keys; k0 += PF_K) {
        __syncthreads();  // previous tile fully consumed (and sq written, first time)
        for (int e = threadIdx.x; e < PF_K * DH; e += blockDim.x) {
            const int j = e / DH, d = e % DH;
            const int kp = k0 + j;
            bf16_t kk = 0, vv = 0;
            if (kp < n_keys) {
                const size_t off = (((size_t)s * S + kp) * Hkv + kvh) * DH + d;
                kk = k_cache[off];
                vv = v_cache[off];
            }
            sk[j][d] = kk;
            sv[j][d] = vv;
        }
        __syncthreads();
#pragma unroll
        for (int a = 0; a < PF_QPW; ++a) {
            const int qi = warp * PF_QPW + a;
            const int qpos = p0 + q0 + qi;  // causal limit of this query
            if (q0 + qi >= n) break;
            if (k0 > qpos) continue;  // whole tile is in this query's future
            // lane j scores key k0 + j
            float sc = 0.0f;
#pragma unroll 8
            for (int d = 0; d < DH; ++d) sc += sq[qi][d] * bf2f(sk[lane][d]);
            if (k0 + lane > qpos || k0 + lane >= n_keys) sc = -INFINITY;
            const float m_new = fmaxf(m[a], warp_max(sc));
            const float corr = expf(m[a] - m_new);
            const float e = expf(sc - m_new);
            l[a] = l[a] * corr + warp_sum(e);
#pragma unroll
            for (int i = 0; i < NPL; ++i) acc[a][i] *= corr;
            for (int j = 0; j < PF_K; ++j) {
                const float pj = __shfl_sync(0xffffffffu, e, j);
#pragma unroll
                for (int i = 0; i < NPL; ++i) acc[a][i] += pj * bf2f(sv[j][lane + 32 * i]);
            }
            m[a] = m_new;
        }
    }
#pragma unroll
    for (int a = 0; a < PF_QPW; ++a) {
        const int qi = q0 + warp * PF_QPW + a;
        if (qi >= n) break;
        const float inv = 1.0f / l[a];
#pragma unroll
        for (int i = 0; i < NPL; ++i) out[((size_t)qi * H + h) * DH + lane + 32 * i] = f2bf(acc[a][i] * inv);
    }
}

extern "C" __global__ void attention_prefill_bf16(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k_cache,
                                                  const bf16_t* __restrict__ v_cache, bf16_t* __restrict__ out, int n,
                                                  int p0, int slot, int H, int Hkv, int Dh, int S) {
    pdl_enter();
    // Declared here, not in the template, so both instantiations share one allocation.
    __shared__ float sq[PF_Q][MAX_DH];
    __shared__ bf16_t sk[PF_K][MAX_DH + 2];  // +2: row stride of 65 words, so lanes reading
                                             // different keys at the same d hit different banks
    __shared__ bf16_t sv[PF_K][MAX_DH];
    if (Dh == 128)
        prefill_tile<4>(q, k_cache, v_cache, out, n, p0, slot, H, Hkv, S, sq, sk, sv);
    else if (Dh == 64)
        prefill_tile<2>(q, k_cache, v_cache, out, n, p0, slot, H, Hkv, S, sq, sk, sv);
}
