// attention.cu: decode attention over the bf16 KV cache (flash-decoding).
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
//   at once, so the launch does not depend on lengths (CUDA graphs). live (nullable, device): rows
//   t ≥ *live return at once (common.cuh live_rows).
// attention_prefill_bf16 (prefill chunks, on tensor cores) lives in prefill_attention.cu.
#include "common.cuh"

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
                             int NS, const int* __restrict__ live) {
    pdl_enter();
    constexpr int DH = NPL * 32;
    __shared__ float sm_m[DEC_WARPS], sm_l[DEC_WARPS];
    __shared__ float sm_acc[DEC_WARPS][DH];
    const int sp = blockIdx.x, h = blockIdx.y, t = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (t >= live_rows(live, gridDim.z)) return;  // all splits of the row return: counter untouched
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
                                    int chunk, int NS, const int* __restrict__ live) {                           \
        if (Dh == 128)                                                                                           \
            decode_split<4, U>(q, k_cache, v_cache, k_self, v_self, pos, slot, part_o, part_ml, out, counters, H, \
                               Hkv, S, slots, chunk, NS, live);                                                  \
        else if (Dh == 64)                                                                                       \
            decode_split<2, U>(q, k_cache, v_cache, k_self, v_self, pos, slot, part_o, part_ml, out, counters, H, \
                               Hkv, S, slots, chunk, NS, live);                                                  \
    }
DECODE_KERNEL(attention_decode_bf16, 8)
DECODE_KERNEL(attention_decode_u1_bf16, 1)
